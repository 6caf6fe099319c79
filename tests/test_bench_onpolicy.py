"""benchmarks/bench_peers.py --on-policy: both programs really sample, at the same settings.

Needs the optional ``bench`` extra (trl); skipped without it (CI installs only ``dev,dist``).
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import load_benchmark

pytest.importorskip("trl")

STEPS, NEW_TOKENS = 2, 8


@pytest.mark.slow
def test_onpolicy_programs_sample_every_step(tiny_dir, tmp_path):
    """kdtool's on-policy jsd and TRL's DistillationTrainer, from ``bench_peers.onpolicy_commands``,
    each run 2 steps on the tiny pair and sample one response per prompt per step."""
    bench_peers = load_benchmark("bench_peers")
    data = tiny_dir / "data" / "train.jsonl"
    cmds = bench_peers.onpolicy_commands(
        tiny_dir / "teacher",
        tiny_dir / "student",
        data,
        tiny_dir / "data" / "test.jsonl",
        tmp_path,
        STEPS,
        NEW_TOKENS,
    )
    assert set(cmds) == {"kdtool", "trl"}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for name, cmd in cmds.items():
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, f"{name}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        # steps, generate calls and 0 < tokens <= steps × batch × new tokens (raises otherwise)
        assert bench_peers.sampled(name, tmp_path, STEPS, NEW_TOKENS) > 0
    trl = json.loads((tmp_path / "trl" / "trl_onpolicy.json").read_text())
    assert trl["completions"] == STEPS * bench_peers.RUN["batch_size"]
    assert (tmp_path / "trl" / "model.safetensors").exists()
    assert (tmp_path / "kdtool" / "model.safetensors").exists()
    config = (tmp_path / "kdtool" / "config.yaml").read_text()
    assert "responses: student" in config and "objective: jsd" in config
