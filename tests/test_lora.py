"""LoRA students (``--lora``): the engine's two paths, adapters that train for fkl, minillm and the
sparse cache, bit-exact resume, ``--merge``, and eval on an adapter run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import kdtool.engine
import kdtool.fused
from conftest import tiny_run_flags
from kdtool import lora, trainer
from kdtool.config import resolve
from kdtool.engine import plain_token_loss_sum, token_loss_sum
from kdtool.errors import UserError
from kdtool.heads import hidden_states, output_head
from kdtool.registry import get_objective
from kdtool.teacher import TeacherSignal

pytest.importorskip("peft")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: 1 thread is fastest, and exact


def cfg_for(tiny_dir, out, **overrides):
    flags = tiny_run_flags(
        tiny_dir,
        out,
        max_steps=6,
        warmup_steps=2,
        eval_every=3,
        save_every=2,
        eval_batches=1,
        max_length=80,
        lora=True,
    )
    flags.update(overrides)
    return resolve(None, flags)


def adapter_weights(directory):
    return load_file(str(directory / lora.ADAPTER_WEIGHTS))


def assert_trained_adapter(run, tiny_dir, adapter_dir):
    """B starts at exactly zero (peft's init), so a non-zero B means the adapter trained; the merged
    model loads with plain transformers and differs from the student it started from."""
    adapter = adapter_weights(adapter_dir)
    b_keys = [k for k in adapter if "lora_B" in k]
    assert b_keys and all(adapter[k].abs().sum() > 0 for k in b_keys)
    merged = AutoModelForCausalLM.from_pretrained(run)
    base = load_file(str(tiny_dir / "student" / "model.safetensors"))
    state = merged.state_dict()
    assert set(base) <= set(state)
    assert any(not torch.equal(base[k], state[k]) for k in base)


# --------------------------------------------------------------------------- engine paths


def lora_model(tiny_dir, targets=None):
    """The tiny student in fp64 with LoRA, B randomised so that every adapter weight gets a gradient."""
    student = AutoModelForCausalLM.from_pretrained(tiny_dir / "student").double()
    cfg = cfg_for(tiny_dir, tiny_dir / "unused", lora_target_modules=targets)
    torch.manual_seed(0)
    lora.apply_lora(student, cfg)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return student


def loss_and_grads(fn, student, teacher, tokenizer, *args):
    ids = torch.tensor([tokenizer.encode("reverse: abcdef => fedcba")] * 2)
    labels = ids[:, 1:].reshape(-1)
    hidden = hidden_states(student, ids, torch.ones_like(ids))[:, :-1].reshape(-1, student.config.n_embd)
    with torch.no_grad():
        t_hidden = hidden_states(teacher, ids, torch.ones_like(ids))[:, :-1].reshape(labels.shape[0], -1)
    signal = TeacherSignal.lazy(t_hidden, output_head(teacher), len(tokenizer))
    student.zero_grad(set_to_none=True)
    loss, _ = fn(get_objective("fkl"), hidden, output_head(student), signal, labels, len(tokenizer), *args)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return loss.detach(), grads


@pytest.mark.parametrize(
    ("targets", "fused"),
    [(None, True), (["c_attn", "lm_head"], False), (["lm_head"], False)],
    ids=["attention-only:fused", "with-lm_head:checkpointed", "lm_head-only:checkpointed"],
)
def test_engine_path_follows_whether_the_output_layer_is_wrapped(
    tiny_dir, tokenizer, targets, fused, monkeypatch
):
    student = lora_model(tiny_dir, targets)
    assert lora.wraps_output_layer(student) is not fused
    assert (kdtool.heads.linear_parts(output_head(student)) is not None) is fused
    teacher = AutoModelForCausalLM.from_pretrained(tiny_dir / "teacher").double().eval()
    calls = {"fused": 0, "checkpointed": 0}
    real_fused, real_ckpt = kdtool.fused.FusedLinearLoss.apply, kdtool.engine.checkpointed_loss

    def spy_fused(*args):
        calls["fused"] += 1
        return real_fused(*args)

    def spy_ckpt(*args):
        calls["checkpointed"] += 1
        return real_ckpt(*args)

    monkeypatch.setattr(kdtool.fused.FusedLinearLoss, "apply", spy_fused)
    monkeypatch.setattr(kdtool.engine, "checkpointed_loss", spy_ckpt)
    chunked = loss_and_grads(token_loss_sum, student, teacher, tokenizer, 7)  # several chunks
    assert calls == {"fused": int(fused), "checkpointed": int(not fused)}
    plain = loss_and_grads(plain_token_loss_sum, student, teacher, tokenizer)
    torch.testing.assert_close(chunked[0], plain[0], rtol=1e-10, atol=1e-12)
    assert chunked[1].keys() == plain[1].keys()
    for name in plain[1]:
        torch.testing.assert_close(chunked[1][name], plain[1][name], rtol=1e-9, atol=1e-12, msg=name)
    # Only the adapters train: the base stays frozen (no gradient on the [V, H] head weight).
    assert all("lora_" in name for name in plain[1])


# --------------------------------------------------------------------------- training runs


def test_fkl_with_merge_trains_the_adapter_and_writes_a_loadable_merged_model(tiny_dir, tmp_path):
    run = trainer.train(cfg_for(tiny_dir, tmp_path / "run", merge=True, lora_r=4, lora_alpha=8))
    for name in ("config.json", "model.safetensors", "kdtool.json", "tokenizer.json"):
        assert (run / name).is_file(), name
    assert not (run / lora.ADAPTER_CONFIG).exists()  # else transformers would load base + adapter
    assert (run / "adapter" / lora.ADAPTER_CONFIG).is_file()
    assert_trained_adapter(run, tiny_dir, run / "adapter")
    summary = json.loads((run / "kdtool.json").read_text())["lora"]
    assert summary == {
        "base_model": str((tiny_dir / "student").resolve()),
        "r": 4,
        "alpha": 8.0,
        "dropout": 0.0,
        "target_modules": ["c_attn"],  # peft's default for GPT-2
        "merged": True,
        "adapter": "adapter",
    }
    step = sorted((run / "checkpoints").iterdir())[-1]
    assert (step / lora.ADAPTER_WEIGHTS).is_file() and not (step / "model.safetensors").exists()
    start = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 < start["trainable_parameters"] < 2000  # rank-4 adapters on one c_attn, not the 3k-row head


def test_minillm_with_lora_trains_the_adapter(tiny_dir, tmp_path):
    options = dict(rollout_batch_size=8, max_new_tokens=6, inner_epochs=2)
    cfg = cfg_for(
        tiny_dir,
        tmp_path / "run",
        objective="minillm",
        max_steps=3,
        grad_accum=2,
        merge=True,
        objective_options=options,
    )
    run = trainer.train(cfg)
    assert_trained_adapter(run, tiny_dir, run / "adapter")


def test_lora_from_the_sparse_cache(tiny_dir, tmp_path):
    from kdtool.cache import CacheConfig, build_cache

    lines = (tiny_dir / "data" / "train.jsonl").read_text().splitlines()[:24]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines) + "\n")
    cache = build_cache(
        CacheConfig(
            teacher=str(tiny_dir / "teacher"),
            data=str(data),
            output=str(tmp_path / "cache"),
            max_length=80,
            batch_size=4,
            progress=False,
        )
    )
    cfg = cfg_for(
        tiny_dir,
        tmp_path / "run",
        objective="slim",
        teacher=None,
        teacher_cache=str(cache),
        data=str(data),
        max_steps=3,
        merge=True,
    )
    run = trainer.train(cfg)
    assert_trained_adapter(run, tiny_dir, run / "adapter")


def test_interrupted_then_resumed_lora_run_equals_uninterrupted(tiny_dir, tmp_path, monkeypatch):
    """Dropout on the LoRA branch makes the RNG state part of what must survive the interruption."""
    common = dict(grad_accum=2, lora_dropout=0.1, lora_target_modules="c_attn,c_fc")
    straight = trainer.train(cfg_for(tiny_dir, tmp_path / "a", **common))
    real_step = trainer.train_step
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # Ctrl-C in the middle of step 4 (after the checkpoint at step 2)
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", flaky)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(cfg_for(tiny_dir, tmp_path / "b", **common))
    assert (tmp_path / "b" / "checkpoints" / "step-000003" / lora.ADAPTER_WEIGHTS).is_file()
    monkeypatch.setattr(trainer, "train_step", real_step)
    resumed = trainer.train(cfg_for(tiny_dir, tmp_path / "b", **common), resume=True)
    a, b = adapter_weights(straight), adapter_weights(resumed)
    assert a.keys() == b.keys() and any("c_fc" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k

    def losses(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if "lr" in r]

    assert losses(straight) == losses(resumed)
    with pytest.raises(UserError, match="different lora_r"):
        trainer.train(cfg_for(tiny_dir, tmp_path / "b", lora_r=4, **common), resume=True)


def test_adapter_run_through_the_cli_then_eval_rougel(tiny_dir, tmp_path, cli):
    run = tmp_path / "run"
    args = ["distill", "--objective", "fkl", "--teacher", tiny_dir / "teacher"]
    args += ["--student", tiny_dir / "student", "--data", tiny_dir / "data" / "train.jsonl"]
    args += ["--output", run, "--max-steps", "2", "--batch-size", "4", "--max-length", "80"]
    args += ["--lora", "--lora-r", "2", "--lora-target-modules", "c_attn, c_proj", "--no-progress"]
    code, out = cli(*args)
    assert code == 0, out
    assert (run / lora.ADAPTER_CONFIG).is_file() and not (run / "config.json").exists()
    assert json.loads((run / lora.ADAPTER_CONFIG).read_text())["r"] == 2
    # Eval rebuilds base + adapter from the run's kdtool.json.
    result = tmp_path / "rouge.json"
    eval_args = ["eval", "rougel", "--model", run, "--data", tiny_dir / "data" / "test.jsonl"]
    eval_args += ["--greedy", "--limit", "4", "--max-new-tokens", "4", "--no-progress", "--output", result]
    code, out = cli(*eval_args)
    assert code == 0, out
    assert json.loads(result.read_text())["summary"]["n_examples"] == 4


def test_adapter_directory_loads_as_base_plus_adapter(tiny_dir, tmp_path, monkeypatch):
    from kdtool.models import load_model

    run = trainer.train(cfg_for(tiny_dir, tmp_path / "run", max_steps=2, eval_every=100))
    merged = load_model(str(run))
    assert type(merged).__name__ == "GPT2LMHeadModel"
    base = load_file(str(tiny_dir / "student" / "model.safetensors"))
    c_attn = "transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(merged.state_dict()[c_attn], base[c_attn])
    # ... so an adapter run can be the student of the next run (`compare --init-from`), here a full one.
    cfg = cfg_for(tiny_dir, tmp_path / "next", student=str(run), lora=False, max_steps=1, eval_every=100)
    following = trainer.train(cfg)
    assert (following / "model.safetensors").is_file()
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now fails as if not installed
    with pytest.raises(UserError, match=r"holds a LoRA adapter: loading it needs the peft package"):
        load_model(str(run))


# --------------------------------------------------------------------------- errors


def test_missing_peft_is_one_line(tiny_dir, tmp_path, cli, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a)
    )
    args = ["distill", "--student", tiny_dir / "student", "--teacher", tiny_dir / "teacher"]
    code, out = cli(*args, "--data", tiny_dir / "data" / "train.jsonl", "--output", tmp_path / "r", "--lora")
    assert code == 1
    assert out.strip() == (
        "error: --lora needs the peft package, which is not installed (pip install 'kdtool[lora]')"
    )


def test_target_modules_from_a_flag_or_a_yaml_list(tiny_dir, tmp_path):
    assert cfg_for(tiny_dir, tmp_path, lora_target_modules=" c_attn, c_proj,").lora_target_modules == [
        "c_attn",
        "c_proj",
    ]
    assert cfg_for(tiny_dir, tmp_path, lora_target_modules=["c_fc"]).lora_target_modules == ["c_fc"]
    assert cfg_for(tiny_dir, tmp_path, lora_target_modules="").lora_target_modules is None  # peft's default


def test_bad_lora_settings_are_refused(tiny_dir, tmp_path):
    with pytest.raises(UserError, match="--merge merges a LoRA adapter: it needs --lora"):
        cfg_for(tiny_dir, tmp_path / "r", lora=False, merge=True)
    with pytest.raises(UserError, match="lora_r"):
        cfg_for(tiny_dir, tmp_path / "r", lora_r=0)
    with pytest.raises(UserError, match=r"--lora: .*set --lora-target-modules"):
        trainer.train(cfg_for(tiny_dir, tmp_path / "r", lora_target_modules="no_such_layer"))


# --------------------------------------------------------------------------- slow: compare, DDP


@pytest.mark.slow
def test_compare_on_adapter_runs(tiny_dir, tmp_path):
    """`kdtool compare` passes --lora to every run and scores the adapter runs."""
    out = tmp_path / "cmp"
    args = [sys.executable, "-m", "kdtool", "compare", "--objectives", "fkl,sft"]
    args += ["--teacher", str(tiny_dir / "teacher"), "--student", str(tiny_dir / "student")]
    args += [
        "--data",
        str(tiny_dir / "data" / "train.jsonl"),
        "--eval-data",
        str(tiny_dir / "data" / "test.jsonl"),
    ]
    args += ["--output", str(out), "--eval-seeds", "10", "--eval-limit", "4", "--max-new-tokens", "4"]
    args += ["--max-steps", "2", "--batch-size", "4", "--lora", "--lora-r", "2"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["status"] for r in runs] == ["ok", "ok"]
    for r in runs:
        assert (Path(r["run"]) / lora.ADAPTER_CONFIG).is_file()
        assert r["rougeL"] is not None


@pytest.mark.slow
def test_two_ddp_ranks_equal_one_process_with_lora(tiny_dir, tmp_path):
    """2 ranks × batch 2 == 1 rank × batch 4: DDP syncs the adapters' gradients (the base is frozen)."""
    conf = tmp_path / "dist.yaml"
    conf.write_text("lr: 0.01\nscheduler: constant\neval_every: 100\nseed: 5\nlora: true\nlora_r: 2\n")
    base = ["--teacher", str(tiny_dir / "teacher"), "--student", str(tiny_dir / "student")]
    base += ["--data", str(tiny_dir / "data" / "train.jsonl"), "--config", str(conf), "--no-progress"]
    base += ["--max-steps", "3", "--max-length", "80"]
    one = tmp_path / "one"
    single = [sys.executable, "-m", "kdtool", "distill", *base, "--batch-size", "4", "--output", str(one)]
    assert subprocess.run(single, capture_output=True, timeout=600).returncode == 0
    two = tmp_path / "two"
    launcher = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node=2"]
    proc = subprocess.run(
        [*launcher, "-m", "kdtool", "distill", *base, "--batch-size", "2", "--output", str(two)],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = adapter_weights(one), adapter_weights(two)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=2e-5, msg=k)
