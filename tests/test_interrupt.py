"""Ctrl-C in the middle of an optimizer step, for real (also with sampled responses): SIGINT arrives after k micro-batches of
step 4 have been drawn, run forward and backward; the run saves the snapshot taken at step 4's
start, and ``--resume`` replays step 4 from its first micro-batch, ending bit-identical to a run
that was never interrupted (weights and every logged loss)."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_run_flags
from kdtool import rollout, trainer
from kdtool.config import resolve
from kdtool.onpolicy import RolloutStep
from kdtool.steps import TokenStep

STEP = 4  # the step the signal interrupts


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: 1 thread is fastest, and exact


def token_cfg(tiny_dir, out, **overrides):
    flags = tiny_run_flags(
        tiny_dir, out, max_steps=6, grad_accum=3, eval_every=3, save_every=2, eval_batches=1, **overrides
    )
    return resolve(None, flags)


def minillm_cfg(tiny_dir, out):
    # 12 rollouts per buffer served in micro-batches of 4, one epoch: a buffer lasts 3 micro-batches,
    # a step takes 2, so step 4 (micro-batches 7 and 8) collects a fresh buffer at its first one.
    flags = tiny_run_flags(
        tiny_dir,
        out,
        max_steps=6,
        grad_accum=2,
        eval_every=100,
        save_every=2,
        eval_batches=1,
        max_length=80,
        objective_options=dict(rollout_batch_size=12, max_new_tokens=6, inner_epochs=1),
    )
    return resolve(None, flags | {"objective": "minillm"})


def interrupt_after(monkeypatch, step_class, accum: int, k: int) -> dict[str, int]:
    """Send SIGINT to this process when micro-batch k + 1 of step STEP starts (k done)."""
    real = step_class.loss
    seen = {"calls": 0}

    def loss(self, ctx, batch):
        seen["calls"] += 1
        if seen["calls"] == (STEP - 1) * accum + k + 1:
            os.kill(os.getpid(), signal.SIGINT)  # delivered here, as KeyboardInterrupt
        return real(self, ctx, batch)

    monkeypatch.setattr(step_class, "loss", loss)
    return seen


def losses(run):
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "lr" in r]


def assert_same_run(a, b):
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    assert losses(a) == losses(b)


ON_POLICY = dict(on_policy_fraction=0.5, max_new_tokens=6, max_length=80)  # half the micro-batches sampled


@pytest.mark.parametrize(
    ("k", "sampled"), [(1, {}), (2, {}), (1, ON_POLICY)], ids=["k=1", "k=2", "k=1-on-policy-mix"]
)
def test_token_objective_resumes_exactly_after_sigint_mid_step(tiny_dir, tmp_path, monkeypatch, k, sampled):
    straight = trainer.train(token_cfg(tiny_dir, tmp_path / "straight", **sampled))
    seen = interrupt_after(monkeypatch, TokenStep, accum=3, k=k)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(token_cfg(tiny_dir, tmp_path / "cut", **sampled))
    assert seen["calls"] == (STEP - 1) * 3 + k + 1  # it stopped inside step 4, after k micro-batches
    checkpoints = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir())
    assert checkpoints[-1] == f"step-{STEP - 1:06d}"  # saved as of step 4's start
    monkeypatch.undo()
    resumed = trainer.train(token_cfg(tiny_dir, tmp_path / "cut", **sampled), resume=True)
    assert_same_run(straight, resumed)


def test_minillm_resumes_exactly_after_sigint_mid_step_with_a_fresh_buffer(tiny_dir, tmp_path, monkeypatch):
    straight = trainer.train(minillm_cfg(tiny_dir, tmp_path / "straight"))
    collected = []
    real_collect = rollout.collect

    def counting_collect(*args, **kwargs):
        collected.append(1)
        return real_collect(*args, **kwargs)

    monkeypatch.setattr(rollout, "collect", counting_collect)
    seen = interrupt_after(monkeypatch, RolloutStep, accum=2, k=1)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(minillm_cfg(tiny_dir, tmp_path / "cut"))
    assert seen["calls"] == (STEP - 1) * 2 + 2
    assert len(collected) == 3  # buffers at micro-batches 1, 4 and 7: the third inside step 4
    monkeypatch.undo()
    resumed = trainer.train(minillm_cfg(tiny_dir, tmp_path / "cut"), resume=True)
    assert_same_run(straight, resumed)
