"""The training loop: writes a loadable student, resumes bit-for-bit, normalises once."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import tiny_run_flags
from kdtool import trainer
from kdtool.config import resolve


def cfg_for(tiny_dir, out, **overrides):
    flags = tiny_run_flags(
        tiny_dir,
        out,
        max_steps=6,
        warmup_steps=2,
        eval_every=3,
        save_every=2,
        eval_batches=2,
    )
    flags.update(overrides)
    return resolve(None, flags)


def weights(path):
    return load_file(str(path / "model.safetensors"))


def test_distill_writes_a_loadable_student_whose_weights_changed(tiny_dir, tmp_path):
    out = trainer.train(cfg_for(tiny_dir, tmp_path / "run"))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.n_embd == 16
    before, after = weights(tiny_dir / "student"), weights(out)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for name in ("config.yaml", "metrics.jsonl", "kdtool.json", "tokenizer.json", "config.json"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["event"] == "start"
    train_lines = [r for r in records if "loss" in r and "lr" in r]
    assert [r["step"] for r in train_lines] == [1, 2, 3, 4, 5, 6]
    evals = [r for r in records if "eval_ce" in r]
    assert [r["step"] for r in evals] == [0, 3, 6] and "eval_fkl" in evals[-1]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000004", "step-000006"]


def test_interrupted_then_resumed_run_equals_uninterrupted(tiny_dir, tmp_path, monkeypatch):
    straight = trainer.train(cfg_for(tiny_dir, tmp_path / "a", grad_accum=2))
    real_step = trainer.train_step
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # Ctrl-C in the middle of step 4 (after checkpoint at step 2)
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", flaky)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(cfg_for(tiny_dir, tmp_path / "b", grad_accum=2))
    assert (tmp_path / "b" / "checkpoints" / "step-000003").is_dir()  # saved on interrupt
    monkeypatch.setattr(trainer, "train_step", real_step)
    resumed = trainer.train(cfg_for(tiny_dir, tmp_path / "b", grad_accum=2), resume=True)
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

    def losses(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if "lr" in r]

    assert losses(straight) == losses(resumed)


def test_gradient_accumulation_invariance(tiny_dir, tmp_path):
    """batch 1 × accumulation 4 gives the same update as batch 4 × accumulation 1."""
    common = dict(max_steps=2, eval_every=100, save_every=100, max_grad_norm=None)
    one = trainer.train(cfg_for(tiny_dir, tmp_path / "acc", batch_size=1, grad_accum=4, **common))
    four = trainer.train(cfg_for(tiny_dir, tmp_path / "big", batch_size=4, grad_accum=1, **common))
    a, b = weights(one), weights(four)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_padded_teacher_vocabulary_is_accepted(tiny_dir, tmp_path, tokenizer):
    """Identical tokenizers, teacher embedding padded past len(tokenizer) (as Qwen2.5 0.5B vs 7B)."""
    from kdtool.synthetic import tiny_model

    padded = tiny_model(tokenizer, n_layer=1, n_embd=32, n_head=2, n_positions=128, seed=1)
    padded.resize_token_embeddings(len(tokenizer) + 14)
    padded.save_pretrained(tmp_path / "padded")
    tokenizer.save_pretrained(tmp_path / "padded")
    out = trainer.train(cfg_for(tiny_dir, tmp_path / "run", teacher=str(tmp_path / "padded"), max_steps=2))
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["eval_fkl"])) for r in evals if "eval_fkl" in r)


def test_foreign_tokenizer_is_refused(tiny_dir, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from kdtool.errors import UserError
    from kdtool.synthetic import tiny_model

    core = Tokenizer(models.WordLevel(vocab={"<eos>": 0, "<unk>": 1, "a": 2, "b": 3}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    other = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", unk_token="<unk>")
    tiny_model(other, n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path / "foreign")
    other.save_pretrained(tmp_path / "foreign")
    from kdtool.synthetic import build_tokenizer

    student_vocab = len(build_tokenizer())
    with pytest.raises(
        UserError, match=rf"tokenizers differ \(teacher vocabulary 4 tokens, student {student_vocab}\)"
    ):
        trainer.train(cfg_for(tiny_dir, tmp_path / "run", teacher=str(tmp_path / "foreign")))


def test_output_dir_holding_another_run_is_refused(tiny_dir, tmp_path):
    from kdtool.errors import UserError

    trainer.train(cfg_for(tiny_dir, tmp_path / "run", max_steps=1))
    with pytest.raises(UserError, match="already holds a run"):
        trainer.train(cfg_for(tiny_dir, tmp_path / "run", max_steps=1))
    with pytest.raises(UserError, match="different objective"):
        trainer.train(cfg_for(tiny_dir, tmp_path / "run", objective="rkl", max_steps=1), resume=True)
    trainer.train(cfg_for(tiny_dir, tmp_path / "run", max_steps=1), overwrite=True)


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_afresh(tiny_dir, tmp_path, monkeypatch):
    """Killed during start-up (here: the first eval dies; no Ctrl-C, so nothing is saved)."""
    from io import StringIO

    from rich.console import Console

    from kdtool import held_out
    from kdtool.errors import UserError

    def killed(*args, **kwargs):
        raise RuntimeError("killed")

    real_evaluate = held_out.evaluate
    monkeypatch.setattr(held_out, "evaluate", killed)
    with pytest.raises(RuntimeError, match="killed"):
        trainer.train(cfg_for(tiny_dir, tmp_path / "run"))
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert not list((tmp_path / "run").glob("checkpoints/step-*"))
    monkeypatch.setattr(held_out, "evaluate", real_evaluate)
    with pytest.raises(UserError, match="different lr"):  # another run's config is still refused
        trainer.train(cfg_for(tiny_dir, tmp_path / "run", lr=1e-3), resume=True)
    notes = StringIO()
    console = Console(file=notes, width=400)
    resumed = trainer.train(cfg_for(tiny_dir, tmp_path / "run"), resume=True, console=console)
    lines = [line for line in notes.getvalue().splitlines() if line.strip()]
    assert lines == [f"--resume: {tmp_path / 'run'} stopped before its first checkpoint; starting it afresh"]
    straight = trainer.train(cfg_for(tiny_dir, tmp_path / "straight"))
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("event") == "start" for r in records) == 1  # one log, from the fresh start


def test_resume_of_a_directory_that_is_no_run_is_refused(tiny_dir, tmp_path):
    from kdtool.errors import UserError

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds no kdtool run to resume"):
        trainer.train(cfg_for(tiny_dir, tmp_path / "run"), resume=True)
