"""benchmarks/gpu_check.sh cannot run here (no GPU): its shell is parsed and its Python parts run
on CPU at small sizes, which checks the code paths, not the GPU numbers."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from conftest import BENCHMARKS, load_benchmark


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_script_parses():
    subprocess.run(["bash", "-n", str(BENCHMARKS / "gpu_check.sh")], check=True)


def test_engine_parity_runs_on_cpu():
    lines = load_benchmark("gpu_check").engine_parity(
        torch.device("cpu"), vocab=300, rows=24, hidden=16, teacher_hidden=24, objectives=("fkl", "atkd")
    )
    rows = [line for line in lines if line.startswith("| fkl") or line.startswith("| atkd")]
    assert len(rows) == 2
    for row in rows:  # relative loss and gradient differences, fp32 on CPU
        rel_loss, rel_grad = (float(x) for x in row.split("|")[4:6])
        assert rel_loss < 1e-5 and rel_grad < 1e-4


def test_tiny_qwen2_and_rollout_check_run_on_cpu(tmp_path):
    check = load_benchmark("gpu_check")
    check.make_models(tmp_path, n_train=16, n_test=4)
    lines = check.rollout_logprobs(tmp_path, torch.device("cpu"), batch=2, max_new_tokens=4)
    assert any("max |Δ log q|" in line for line in lines)


def test_same_eval_ignores_timings_only(tmp_path):
    import json

    check = load_benchmark("gpu_check")
    a, b, c = (tmp_path / f"{n}.json" for n in "abc")
    a.write_text(json.dumps({"summary": {"rougeL": {"mean": 50.0}}, "per_seed": [{"wall_s": 1.0, "p": "x"}]}))
    b.write_text(json.dumps({"summary": {"rougeL": {"mean": 50.0}}, "per_seed": [{"wall_s": 2.0, "p": "x"}]}))
    c.write_text(json.dumps({"summary": {"rougeL": {"mean": 50.0}}, "per_seed": [{"wall_s": 1.0, "p": "y"}]}))
    assert "agree" in check.same_eval(a, b)
    assert "differ" in check.same_eval(a, c)


def test_issue14_checks_run_on_cpu():
    check = load_benchmark("gpu_check")
    cpu = torch.device("cpu")
    rows = [line for line in check.cuda_vs_cpu(cpu, vocab=512, rows=16, hidden=8) if "| fp32 |" in line]
    assert len(rows) == 4
    for row in rows:  # the fused engine in fp32 against the plain loss in fp64
        rel_loss, rel_grad = (float(x) for x in row.split("|")[3:5])
        assert rel_loss < 1e-5 and rel_grad < 1e-4
    speed = check.qwen_step_speed(cpu, vocab=512, batch=2, seq=16, steps=1, tiny=True)
    assert [
        line.split("|")[1].strip() for line in speed if line.startswith("| fkl") or line.startswith("| sft")
    ] == [
        "fkl",
        "sft",
    ]
    rollout = check.rollout_speed(cpu, vocab=512, batch=2, prompt=4, new_tokens=4, tiny=True)
    assert (
        sum("tokens/s" not in line and line.startswith("| ") and "---" not in line for line in rollout) == 2
    )
