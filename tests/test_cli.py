"""The CLI through a real subprocess: one clear line and a non-zero exit for user mistakes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from kdtool import allocator

GLIBC = allocator.is_glibc()


def kdtool(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "kdtool", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def distill_args(tiny_dir, out, *extra):
    return (
        "distill",
        "--teacher",
        str(tiny_dir / "teacher"),
        "--student",
        str(tiny_dir / "student"),
        "--data",
        str(tiny_dir / "data" / "train.jsonl"),
        "--output",
        str(out),
        "--no-progress",
        *extra,
    )


def assert_one_line_error(proc, pattern):
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert pattern in lines[0], lines[0]


def test_objectives_lists_builtins_with_options():
    proc = kdtool("objectives")
    assert proc.returncode == 0
    for name in ("fkl", "rkl", "sft", "jsd", "tvd"):
        assert name in proc.stdout
    assert "ce_weight" in proc.stdout


def test_unknown_objective_lists_known_ones(tiny_dir, tmp_path):
    proc = kdtool(*distill_args(tiny_dir, tmp_path / "r", "--objective", "nope"))
    assert_one_line_error(proc, "unknown objective 'nope'; known objectives: atkd, fkl")


def test_missing_data_file(tiny_dir, tmp_path):
    args = list(distill_args(tiny_dir, tmp_path / "r"))
    args[args.index("--data") + 1] = str(tmp_path / "missing.jsonl")
    assert_one_line_error(kdtool(*args), "data file not found")


def test_malformed_line_reports_file_and_line(tiny_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"\n')
    args = list(distill_args(tiny_dir, tmp_path / "r"))
    args[args.index("--data") + 1] = str(bad)
    assert_one_line_error(kdtool(*args), f"{bad}:2: not valid JSON")


def test_cuda_requested_but_absent(tiny_dir, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the refusal only applies without it")
    proc = kdtool(*distill_args(tiny_dir, tmp_path / "r", "--device", "cuda", "--max-steps", "1"))
    assert_one_line_error(proc, "CUDA is not available")


def test_missing_teacher_for_a_kd_objective(tiny_dir, tmp_path):
    proc = kdtool(
        "distill",
        "--student",
        str(tiny_dir / "student"),
        "--data",
        str(tiny_dir / "data" / "train.jsonl"),
        "--output",
        str(tmp_path / "r"),
        "--objective",
        "rkl",
    )
    assert_one_line_error(proc, "needs --teacher")


def test_debug_shows_traceback(tiny_dir, tmp_path):
    proc = kdtool("--debug", *distill_args(tiny_dir, tmp_path / "r", "--objective", "nope"))
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_distill_cli_end_to_end_with_config_file(tiny_dir, tmp_path):
    """Config file values apply, flags override them, objective options come through -O."""
    conf = tmp_path / "run.yaml"
    conf.write_text(
        "objective: rkl\nbatch_size: 4\nmax_steps: 3\nlr: 0.01\nobjective_options:\n  temperature: 2.0\n"
    )
    out = tmp_path / "r"
    proc = kdtool(
        *distill_args(
            tiny_dir,
            out,
            "--config",
            str(conf),
            "--objective",
            "fkl",
            "-O",
            "ce_weight=0.5",
            "--max-steps",
            "2",
        )
    )
    assert proc.returncode == 0, proc.stderr
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["objective"] == "fkl" and saved["max_steps"] == 2 and saved["batch_size"] == 4
    assert saved["objective_options"] == {"temperature": 2.0, "ce_weight": 0.5}
    assert json.loads((out / "kdtool.json").read_text())["steps"] == 2
    start = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    if GLIBC and "GLIBC_TUNABLES" not in os.environ:  # the console script re-executed itself once
        assert start["cpu_allocator"]["tcache_count"] == 0
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(
        r"student written to .+ \(wall [\d.]+ s, of which evaluation [\d.]+ s \([\d.]+%\)\)", last
    )
    again = kdtool(*distill_args(tiny_dir, out, "--max-steps", "1"))
    assert_one_line_error(again, "already holds a run")
