"""minillm through the real trainer: metrics in metrics.jsonl, weights move, bit-for-bit resume."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: 1 thread is fastest, and exact


def run_cfg(tiny_dir, out, **overrides):
    from kdtool.config import resolve

    flags = dict(
        objective="minillm",
        teacher=str(tiny_dir / "teacher"),
        student=str(tiny_dir / "student"),
        data=str(tiny_dir / "data" / "train.jsonl"),
        output=str(out),
        max_steps=6,
        batch_size=4,
        grad_accum=2,
        lr=1e-2,
        log_every=1,
        eval_every=100,
        save_every=2,
        eval_batches=1,
        max_length=80,
        progress=False,
        seed=3,
        objective_options=dict(rollout_batch_size=8, max_new_tokens=6, inner_epochs=2),
    )
    flags.update(overrides)
    return resolve(None, flags)


def test_trains_through_the_trainer_and_logs_the_metrics(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    from kdtool import trainer

    out = trainer.train(run_cfg(tiny_dir, tmp_path / "run"))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "lr" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for key in ("rkl", "reward", "response_length", "clip_fraction", "lm_loss", "pg_loss", "single_step_kl"):
        assert all(key in r for r in steps), key
    assert all(1 <= r["response_length"] <= 6 for r in steps)
    before, after = (
        load_file(str(tiny_dir / "student" / "model.safetensors")),
        load_file(str(out / "model.safetensors")),
    )
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_interrupted_then_resumed_run_equals_uninterrupted(tiny_dir, tmp_path, monkeypatch):
    """The rollout buffer, the position in it and the samplers' RNG states travel in the
    checkpoint: 2 buffers (4 micro-batches × 2 epochs each = 4 steps) are crossed mid-run."""
    from safetensors.torch import load_file

    from kdtool import trainer

    straight = trainer.train(run_cfg(tiny_dir, tmp_path / "a"))
    real_step = trainer.train_step
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", flaky)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(run_cfg(tiny_dir, tmp_path / "b"))
    monkeypatch.setattr(trainer, "train_step", real_step)
    resumed = trainer.train(run_cfg(tiny_dir, tmp_path / "b"), resume=True)
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k

    def losses(run):
        return [
            r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "lr" in r
        ]

    assert losses(straight) == losses(resumed)
