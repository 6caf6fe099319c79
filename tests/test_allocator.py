"""kdtool.allocator: glibc malloc settings for CPU training, and that they do what they claim."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

GLIBC = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None

# Page faults of 40 allocate-touch-free cycles of a 64 MiB tensor (above glibc's largest dynamic mmap
# threshold, so by default each one is a fresh mmap whose 16,384 pages fault in), after `tune`.
PROBE = """
import json, resource, sys
import torch
from kdtool import allocator
applied = allocator.tune_for_training(sys.argv[1])
again = allocator.tune_for_training(sys.argv[1])
x = torch.ones(16 * 2**20); del x  # the first block faults in either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    x = torch.ones(16 * 2**20)
    del x
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "again": again, "faults": faults}))
"""


def probe(device: str, **env: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, device],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
        timeout=120,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's mallopt parameters")
def test_cpu_runs_reuse_freed_blocks_instead_of_faulting_fresh_pages():
    tuned, system = probe("cpu"), probe("cpu", KDTOOL_CPU_ALLOCATOR="system")
    assert tuned["applied"] == {"mmap_threshold": 2**30, "trim_threshold": 2**30, "arena_max": 1}
    assert tuned["again"] == tuned["applied"]  # once per process, the same answer after
    assert system["applied"] == {}
    pages = 16 * 2**20 * 4 // 4096
    assert system["faults"] > 30 * pages  # glibc's defaults: fresh pages nearly every cycle
    assert tuned["faults"] < 8 * pages  # tuned: the freed block is reused (a few cycles fault at most)


def test_nothing_changes_off_cpu():
    assert probe("cuda")["applied"] == {}
