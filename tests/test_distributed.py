"""Multi-process training through the real launchers, on CPU with the gloo backend."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdtool import trainer
from kdtool.config import resolve

BIN = Path(sys.executable).parent


def common(tiny_dir, conf):
    return [
        "--teacher",
        str(tiny_dir / "teacher"),
        "--student",
        str(tiny_dir / "student"),
        "--data",
        str(tiny_dir / "data" / "train.jsonl"),
        "--config",
        str(conf),
        "--no-progress",
    ]


def torchrun(*args, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        str(BIN / "torchrun"),
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "kdtool",
        "distill",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def single(tiny_dir, out, steps):
    return trainer.train(
        resolve(
            None,
            dict(
                objective="fkl",
                teacher=str(tiny_dir / "teacher"),
                student=str(tiny_dir / "student"),
                data=str(tiny_dir / "data" / "train.jsonl"),
                output=str(out),
                max_steps=steps,
                batch_size=4,
                lr=1e-2,
                scheduler="constant",
                eval_every=100,
                seed=5,
                progress=False,
            ),
        )
    )


def assert_same_weights(a: Path, b: Path, atol=2e-5):
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol)


@pytest.fixture
def conf(tmp_path):
    path = tmp_path / "dist.yaml"
    path.write_text("batch_size: 2\nlr: 0.01\nscheduler: constant\neval_every: 100\nseed: 5\nsave_every: 2\n")
    return path


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "flags"), [("ddp", []), ("fsdp", ["--fsdp", "--fsdp-teacher"])])
def test_two_processes_equal_one_process_and_resume(tiny_dir, tmp_path, conf, strategy, flags):
    """2 ranks × batch 2 == 1 rank × batch 4 (same global batch), and a 2-rank checkpoint resumes."""
    reference = single(tiny_dir, tmp_path / "single", steps=4)
    out = tmp_path / strategy
    report = ["--report-to", "tensorboard"] if importlib.util.find_spec("tensorboard") else []
    first = torchrun(*common(tiny_dir, conf), *flags, *report, "--output", str(out), "--max-steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    if report:  # rank 0 alone reports: one event file, not one per rank
        assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    start = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert start["world_size"] == 2
    assert start["strategy"] == strategy and start["teacher_sharded"] == ("--fsdp-teacher" in flags)
    assert first.stdout.count("student written") == 1  # rank 0 alone writes and reports
    resumed = torchrun(*common(tiny_dir, conf), *flags, "--output", str(out), "--max-steps", "4", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr
    assert_same_weights(reference, out)
    # a checkpoint written by two processes is refused by one, with a clear line
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kdtool",
            "distill",
            *common(tiny_dir, conf),
            "--output",
            str(out),
            "--max-steps",
            "6",
            "--resume",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and "written by 2 process(es)" in proc.stderr


@pytest.mark.slow
def test_accelerate_launch_starts(tiny_dir, tmp_path, conf):
    accelerate = shutil.which("accelerate", path=str(BIN))
    if accelerate is None:
        pytest.skip("accelerate is not installed (pip install 'kdtool[dist]')")
    out = tmp_path / "acc"
    cmd = [
        accelerate,
        "launch",
        "--cpu",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "kdtool",
        "distill",
        *common(tiny_dir, conf),
        "--output",
        str(out),
        "--max-steps",
        "2",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model.safetensors").is_file()
