"""kdtool.allocator: glibc malloc settings for CPU training, and that they do what they claim."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import pytest

from kdtool import allocator

GLIBC = allocator.is_glibc()
MALLINFO2 = GLIBC and hasattr(ctypes.CDLL(None), "mallinfo2")  # glibc >= 2.33

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


def last_line(script: str, *args: str, **env: str) -> str:
    """The last line ``script`` prints, run in a fresh interpreter with ``env`` added to ours."""
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
        timeout=120,
    )
    return proc.stdout.strip().splitlines()[-1]


def probe(device: str, **env: str) -> dict:
    return json.loads(last_line(PROBE, device, **env))


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's mallopt parameters")
def test_cpu_runs_reuse_freed_blocks_instead_of_faulting_fresh_pages():
    # as a `kdtool` run allocates: the mallopt settings, and glibc's tcache off from the start (with the
    # tcache on, its pieces keep the first ~8 freed blocks from being reused: 7-8 of 40 cycles fault)
    tuned = probe("cpu", GLIBC_TUNABLES=allocator.TCACHE_OFF)
    system = probe("cpu", KDTOOL_CPU_ALLOCATOR="system")
    assert tuned["applied"] == {
        "mmap_threshold": 2**30,
        "trim_threshold": 2**30,
        "arena_max": 1,
        "mxfast": 0,
        "tcache_count": 0,
    }
    assert tuned["again"] == tuned["applied"]  # once per process, the same answer after
    assert system["applied"] == {}
    pages = 16 * 2**20 * 4 // 4096
    assert system["faults"] > 30 * pages  # glibc's defaults: fresh pages nearly every cycle
    assert tuned["faults"] < 3 * pages  # tuned: the freed block is reused (one cycle faults, here)


# Small chunks freed while others stay allocated between them (so they cannot merge into the top):
# with glibc's fastbins each waits in a fastbin, unmerged, until a large request consolidates them (or
# the free of a larger block that merges into 64 KiB or more: so nothing else is freed in between).
FASTBINS = """
import ctypes, json, sys
from kdtool import allocator
allocator.tune_for_training("cpu")
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype, libc.malloc.restype = Info, ctypes.c_void_p
chunks = [ctypes.c_void_p(libc.malloc(40)) for _ in range(2000)]
every_other = chunks[::2]
for p in every_other:
    libc.free(p)
info = libc.mallinfo2()
print(json.dumps({"fast_chunks": info.smblks}))
"""


@pytest.mark.skipif(not MALLINFO2, reason="needs glibc's mallinfo2 (glibc >= 2.33)")
def test_cpu_runs_merge_freed_small_chunks_at_once():
    def fast_chunks(**env: str) -> int:
        out = last_line(FASTBINS, GLIBC_TUNABLES=allocator.TCACHE_OFF, **env)
        return json.loads(out)["fast_chunks"]

    assert fast_chunks() == 0  # as a run allocates: merged with their free neighbours when freed
    assert fast_chunks(KDTOOL_CPU_ALLOCATOR="system") >= 1000  # glibc's defaults: all 1,000 wait


def test_nothing_changes_off_cpu():
    assert probe("cuda")["applied"] == {}


# Heap growth (VmHWM) over three rounds of an fkl-like slice loop: [128, V] temporaries made and freed,
# with the small results of each slice kept (as the engine keeps loss parts and metric sums). Whether
# the tcache's pieces pin the freed blocks depends on where the heap's top sits relative to PyTorch's
# 64-byte alignment, so a 9 MiB + argv[1] bytes block taken from the top first sets that (per process
# the outcome still varies: the tests try several).
SLICES = """
import ctypes, re, sys, torch
from kdtool import allocator
allocator.tune_for_training("cpu")
torch.set_num_threads(1)
ctypes.CDLL(None).malloc(9 * 2**20 + int(sys.argv[1]))
def hwm():
    return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 2**10
w, wt = torch.randn(16384, 32), torch.randn(16384, 32)
h, t = torch.randn(1024, 32), torch.randn(1024, 32)
before, keep = hwm(), []
for _ in range(3):
    for r in range(0, 1024, 128):
        z = h[r : r + 128] @ w.t()
        log_q = torch.log_softmax(z, -1)
        log_p = torch.log_softmax(t[r : r + 128] @ wt.t(), -1)
        p = log_p.exp()
        keep.append((log_p - log_q).masked_fill_(p == 0, 0).mul_(p).sum(-1))
        z.copy_(torch._log_softmax_backward_data(p.neg_(), log_q, -1, log_q.dtype))
        keep.append(z.sum())
        del z, log_q, log_p, p
print(hwm() - before)
"""
SHIFTS = (16, 32, 48, 64, 80, 16, 32, 48)


def heap_growth(shift: int, **env: str) -> float:
    """MiB the RSS high-water mark rose by in ``SLICES`` (about 50 MiB are alive at once)."""
    return float(last_line(SLICES, str(shift), **env))


@pytest.mark.skipif(not GLIBC, reason="GLIBC_TUNABLES is glibc's")
def test_without_the_tcache_freed_blocks_merge_and_the_heap_stays_near_the_live_set():
    off = [heap_growth(shift, GLIBC_TUNABLES=allocator.TCACHE_OFF) for shift in SHIFTS[:3]]
    assert max(off) < 130, off  # ~50 MiB alive at once: the heap reuses its freed blocks, every time
    # With glibc's default tcache (7 per size) the heap grows by most of each slice's temporaries in
    # most processes (here 60-100% of them per shift): one of up to eight must show it.
    cached = []
    for shift in SHIFTS:
        cached.append(heap_growth(shift, GLIBC_TUNABLES="glibc.malloc.tcache_count=7"))
        if cached[-1] > 2.5 * max(off):
            break
    assert cached[-1] > 2.5 * max(off), (cached, off)


def test_start_record_lists_the_tcache_only_when_it_is_off():
    if not GLIBC:
        assert probe("cpu", GLIBC_TUNABLES=allocator.TCACHE_OFF)["applied"] == {}
        return
    assert probe("cpu", GLIBC_TUNABLES=allocator.TCACHE_OFF)["applied"]["tcache_count"] == 0
    assert "tcache_count" not in probe("cpu", GLIBC_TUNABLES="glibc.malloc.tcache_count=7")["applied"]


ARGS = ["/venv/bin/python", "/venv/bin/kdtool", "distill", "--teacher", "t", "--output", "eval"]


@pytest.mark.skipif(not GLIBC, reason="the re-execution happens on glibc only")
def test_model_commands_reexecute_once_with_the_tcache_off():
    argv, env = allocator.exec_args(ARGS, "/usr/bin/python3", {"PATH": "/bin"})
    assert argv == ["/usr/bin/python3", *ARGS[1:]]  # same script and arguments, this interpreter
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}
    assert allocator.exec_args(ARGS, "/usr/bin/python3", env) is None  # once: the child runs as it is
    # the user's other tunables are kept, theirs come first
    _, env = allocator.exec_args(ARGS, "py", {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.tcache_count=0"
    assert allocator.tcache_off(env)
    for command in (
        ["eval", "rougel"],
        ["compare"],
        ["demo"],
        ["generate"],
        ["cache-logits"],
        ["--debug", "demo"],
    ):
        assert allocator.exec_args(["python", "-m", "kdtool", *command], "py", {}) is not None, command


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["kdtool", "--help"], {}),
        (["kdtool", "distill", "--help"], {}),
        (["kdtool", "objectives"], {}),
        (["kdtool"], {}),
        (ARGS, {"KDTOOL_CPU_ALLOCATOR": "system"}),
        (ARGS, {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=3"}),  # the user's own setting stands
    ],
)
def test_no_reexecution_where_it_is_not_needed_or_not_wanted(argv, env):
    assert allocator.exec_args(argv, "/usr/bin/python3", env) is None
    assert not allocator.tcache_off(env)


def test_tcache_off_reads_the_last_setting():
    assert allocator.tcache_off({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"})
    assert not allocator.tcache_off(
        {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0:glibc.malloc.tcache_count=7"}
    )
    assert not allocator.tcache_off({})


def test_a_failed_reexecution_leaves_the_process_running(monkeypatch):
    calls = []

    def fail(*args):
        calls.append(args)
        raise PermissionError("not executable")

    monkeypatch.setattr(allocator, "exec_args", lambda *a: (["/no/python", "distill"], {"A": "1"}))
    monkeypatch.setattr(allocator.os, "execve", fail)
    allocator.reexec_without_tcache()  # returns: the command runs without the setting
    assert calls == [("/no/python", ["/no/python", "distill"], {"A": "1"})]
