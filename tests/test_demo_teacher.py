"""The demo's shipped teacher: it knows the task, and kdtool's own command reproduces it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from kdtool import demo


def shipped_records() -> list[dict]:
    """Every line of the shipped teacher's ``metrics.jsonl``, its start line first."""
    lines = (demo.shipped_teacher() / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def shipped_log() -> list[dict]:
    return [r for r in shipped_records() if "step" in r]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    """The demo's data and initial models, written exactly as ``kdtool demo`` writes them."""
    return demo.prepare(tmp_path_factory.mktemp("demo"))


def test_shipped_teacher_knows_every_sub_task(demo_data):
    """≥ 90% valid greedy and ≥ 80% valid when sampling at temperature 1, on every sub-task.

    "Sampling" here is its exact expectation, Σ over the valid answers of q(answer, EOS | prompt),
    so the bar is checked without generation noise (the demo report also samples).
    """
    from kdtool.task_eval import evaluate_task

    metrics = evaluate_task(demo.shipped_teacher(), demo_data["test"])
    for task, row in metrics.items():
        assert row["greedy"] >= 90, (task, row)
        assert row["expected"] >= 80, (task, row)
    assert metrics["all"]["n"] == demo.TEST_EXAMPLES


def test_shipped_teacher_matches_its_own_log(demo_data):
    """The checkpoint is the one its log describes: its held-out CE is the log's last eval."""
    import torch

    from kdtool.data import TokenizedDataset, load_examples
    from kdtool.models import load_model, load_tokenizer

    final = [r for r in shipped_log() if "eval_ce" in r][-1]
    assert final["step"] == demo.TEACHER_TRAIN["max_steps"]
    model = load_model(str(demo.shipped_teacher())).eval()
    tok = load_tokenizer(str(demo.shipped_teacher()))
    examples = load_examples(demo_data["test"])
    ds = TokenizedDataset(examples, tok, 128, None)
    batch_size, batches = demo.TEACHER_TRAIN["batch_size"], 4  # the recipe's eval: 4 batches of 64
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(batches):
            batch = ds.batch(range(b * batch_size, (b + 1) * batch_size))
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            log_q = torch.log_softmax(logits[:, :-1].float(), -1)
            mask = labels != -100
            total -= log_q.gather(-1, labels.clamp(min=0)[..., None])[..., 0][mask].sum().item()
            count += int(mask.sum())
    assert total / count == pytest.approx(final["eval_ce"], rel=1e-4)


@pytest.mark.slow
def test_the_recipe_reproduces_the_shipped_training_run(demo_data, tmp_path):
    """`kdtool distill` with the recipe's flags retraces the shipped log (the first 300 of 4,000 steps).

    The run is really interrupted (SIGINT, as Ctrl-C) once its step-300 record is written, so the
    schedule is the full run's. The learning rate and the token count of every window (the same
    batches in the same order) must match exactly, and the losses, gradient norms and held-out CE of
    the first 100 steps to 1e-5. Later windows match to 1e-5 with the torch and CPU kernels the
    shipped run recorded in its start line; with other kernels (AVX2 here against the machine that
    trained the shipped teacher, whose log predates that record) rounding differs from the first
    step and training amplifies it: measured 1e-6 at step 100, 0.5% (loss) and 3.5% (gradient
    norm) at step 200, 1.5% at step 300, 13% at step 500. There the bound is 10%.
    """
    out = tmp_path / "teacher"
    recipe = json.loads((demo.shipped_teacher() / "recipe.json").read_text())
    paths = {k: str(v) for k, v in demo_data.items()}
    args = [a.format(**paths, output=out) for a in recipe["args"]]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kdtool", *args, "--no-progress"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics, deadline = out / "metrics.jsonl", time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            if metrics.is_file() and '"step": 300,' in metrics.read_text():
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert "interrupted" in output, output[-2000:]
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    shipped = shipped_records()
    kernels = ("torch", "cpu_capability")
    same_kernels = all(shipped[0].get(k) == lines[0][k] for k in kernels)
    got = [r for r in lines if "step" in r]
    want = {(r["step"], "eval_ce" in r): r for r in shipped if "step" in r}
    compared = []
    for record in got:
        if record["step"] > 300:
            continue
        ref = want[(record["step"], "eval_ce" in record)]
        assert record.get("tokens") == ref.get("tokens"), record["step"]
        if "lr" in ref:
            assert record["lr"] == pytest.approx(ref["lr"], rel=1e-12), record["step"]
        rel = 1e-5 if same_kernels or record["step"] <= 100 else 0.1
        for key in ("loss", "grad_norm", "eval_ce"):
            if key in ref:
                assert record[key] == pytest.approx(ref[key], rel=rel), (record["step"], key, same_kernels)
                compared.append((record["step"], key))
    assert [k for k in compared if k[0] in (0, 100, 300)] == [
        (0, "eval_ce"),
        (100, "loss"),
        (100, "grad_norm"),
        (300, "loss"),
        (300, "grad_norm"),
    ]
