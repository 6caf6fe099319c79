"""The sparse teacher cache: exact round trip, trainer order, refusal of a mismatched cache,
resume equality, and training from it with no teacher loaded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import kdtool
from kdtool.cache import CacheConfig, TeacherCache, build_cache, teacher_top_k
from kdtool.config import resolve
from kdtool.data import IGNORE_INDEX, BatchLoader, TokenizedDataset, load_examples
from kdtool.errors import UserError
from kdtool.heads import output_head
from kdtool.models import load_tokenizer
from kdtool.teacher import TeacherSignal

MAX_LENGTH = 96


@pytest.fixture(scope="module")
def small(tiny_dir, tmp_path_factory) -> Path:
    """24 examples of the synthetic task (the tiny teacher/student come from ``tiny_dir``)."""
    root = tmp_path_factory.mktemp("cache_data")
    lines = (tiny_dir / "data" / "train.jsonl").read_text().splitlines()[:24]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root / "train.jsonl"


def cache_cfg(tiny_dir, data, out, **kw) -> CacheConfig:
    values = dict(
        teacher=str(tiny_dir / "teacher"),
        data=str(data),
        output=str(out),
        max_length=MAX_LENGTH,
        batch_size=4,
        examples_per_shard=7,
        progress=False,
    )
    values.update(kw)
    return CacheConfig(**values)


def run_cfg(tiny_dir, data, cache, out, **kw):
    flags = dict(
        objective="slim",
        student=str(tiny_dir / "student"),
        teacher_cache=str(cache),
        data=str(data),
        output=str(out),
        max_length=MAX_LENGTH,
        progress=False,
    )
    flags.update(kw)
    return resolve(None, flags)


@pytest.fixture(scope="module")
def built(tiny_dir, small, tmp_path_factory) -> Path:
    return build_cache(cache_cfg(tiny_dir, small, tmp_path_factory.mktemp("c") / "cache"))


@pytest.fixture(scope="module")
def teacher(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir / "teacher").eval()


def dataset(tiny_dir, data):
    tok = load_tokenizer(str(tiny_dir / "teacher"))
    return TokenizedDataset(load_examples(data), tok, MAX_LENGTH, None), tok


def test_round_trip_stores_the_teachers_top_k_logits(tiny_dir, small, built, teacher):
    manifest = json.loads((built / "manifest.json").read_text())
    ds, tok = dataset(tiny_dir, small)
    V, k = len(tok), manifest["k"]
    assert manifest["complete"] and manifest["num_examples"] == len(ds) == 24
    assert k == -(-5 * V // 100)  # ceil(0.05 V)
    assert manifest["index_dtype"] == "uint16" and manifest["value_dtype"] == "float16"
    assert manifest["bytes_per_token"] == k * 4 + 4
    cache = TeacherCache.open(built)
    total = 0
    for i, item in enumerate(ds.items):
        # The reference: this example alone (no padding), the plain HF forward.
        ids = torch.tensor([item.input_ids])
        with torch.no_grad():
            logits = teacher(input_ids=ids).logits[0, :-1, :V]  # [T-1, V]
        logits = logits[torch.tensor(item.labels[1:]) != IGNORE_INDEX]  # [n, V]
        values, indices, lse = cache.rows(i)
        assert values.dtype == torch.float16 and indices.dtype == torch.uint16
        assert values.shape == (logits.shape[0], k)
        # Values are the teacher's logits at the stored ids, to fp16 rounding ...
        at = logits.gather(-1, indices.long())
        torch.testing.assert_close(values.float(), at, rtol=1e-3, atol=1e-3)
        # ... sorted descending, and the stored set is the top k: nothing outside beats it.
        assert (values[:, :-1] >= values[:, 1:]).all()
        outside = logits.scatter(-1, indices.long(), float("-inf")).max(-1).values
        assert (outside <= at.min(-1).values + 1e-5).all()
        torch.testing.assert_close(lse, torch.logsumexp(logits, -1), rtol=1e-5, atol=1e-5)
        total += logits.shape[0]
    assert total == manifest["num_tokens"] == ds.num_target_tokens()


def test_q8_values_are_within_half_a_step_and_keep_the_top_k(tiny_dir, small, built, tmp_path):
    q8 = build_cache(cache_cfg(tiny_dir, small, tmp_path / "q8", value_dtype="q8"))
    manifest = json.loads((q8 / "manifest.json").read_text())
    assert manifest["bytes_per_token"] == manifest["k"] * 3 + 12
    half, quarter = TeacherCache.open(built), TeacherCache.open(q8)
    for i in range(len(half)):
        v16, idx16, lse16 = half.rows(i)
        v8, idx8, lse8 = quarter.rows(i)
        assert torch.equal(idx16, idx8) and torch.equal(lse16, lse8)
        v16 = v16.float()
        step = (v16.max(-1).values - v16.min(-1).values) / 254  # per token  [n]
        # half a quantisation step, plus the fp16 rounding of the reference itself
        assert ((v8 - v16).abs() <= step.unsqueeze(-1) / 2 + 2e-3).all()
        assert (v8[:, :-1] >= v8[:, 1:]).all()


def test_q8_codes_handle_minus_inf_and_flat_rows():
    from kdtool.cache import dequantize_q8, quantize_q8

    values = torch.tensor([[3.0, 1.0, float("-inf")], [2.0, 2.0, 2.0], [float("-inf")] * 3, [1e4, 0.0, -1e4]])
    codes, offset, scale = quantize_q8(values)
    back = dequantize_q8(codes, offset, scale)
    assert torch.isneginf(back[0, 2]) and torch.isneginf(back[2]).all()
    torch.testing.assert_close(back[0, :2], values[0, :2])
    torch.testing.assert_close(back[1], values[1])
    assert ((back[3] - values[3]).abs() <= 2e4 / 508 + 1e-2).all()


def test_signal_for_a_training_batch_follows_the_trainers_mask_order(tiny_dir, small, built, teacher):
    ds, tok = dataset(tiny_dir, small)
    cache = TeacherCache.open(built)
    loader = iter(BatchLoader(ds, batch_size=5, seed=11))
    for _ in range(3):
        batch = next(loader)
        signal = cache.signal_for(batch)
        values, indices, lse = teacher_top_k(teacher, output_head(teacher), batch, len(tok), cache.k)
        assert signal.is_sparse and signal.vocab_size == len(tok)
        assert signal.indices.dtype == torch.long
        torch.testing.assert_close(signal.values.float(), values.half().float())
        assert torch.equal(signal.indices, indices)
        torch.testing.assert_close(signal.log_normalizer, lse)


def test_masked_stand_in_batch_gives_an_empty_signal(tiny_dir, small, built):
    ds, _ = dataset(tiny_dir, small)
    batch = ds.batch([3, 4])
    batch["labels"].fill_(IGNORE_INDEX)
    signal = TeacherCache.open(built).signal_for(batch)
    assert len(signal) == 0 and signal.values.shape[-1] == TeacherCache.open(built).k


def test_sparse_kl_from_a_full_cache_equals_dense_kl(tiny_dir, small, tmp_path, teacher):
    """k = V (fp32 values): fkl and slim from the cache equal fkl and slim on the live teacher."""
    ds, tok = dataset(tiny_dir, small)
    V = len(tok)
    full = build_cache(cache_cfg(tiny_dir, small, tmp_path / "full", top_k=V, value_dtype="float32"))
    batch = ds.batch(list(range(8)))
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    with torch.no_grad():
        live = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    live = live[:, :-1, :V][mask]  # [N, V]
    student = torch.randn(live.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cached = TeacherCache.open(full).signal_for(batch)
    for name, opts in (("fkl", {}), ("slim", {"top_k": V}), ("slim", {"missing_mass": True})):
        obj = kdtool.get_objective(name, **opts)
        a, _ = obj.loss(student, TeacherSignal.dense(live), labels[mask])
        b, _ = obj.loss(student, cached, labels[mask])
        assert float(b) == pytest.approx(float(a), rel=1e-5), name


def test_mismatched_cache_is_refused_with_one_line(tiny_dir, small, built, tmp_path):
    tok = load_tokenizer(str(tiny_dir / "student"))
    ok = run_cfg(tiny_dir, small, built, tmp_path / "r")
    TeacherCache.open(built, tokenizer=tok, config=ok)  # the matching run is accepted

    other_data = tmp_path / "other.jsonl"
    other_data.write_text(small.read_text().replace('"output": "', '"output": "x', 1))
    cases = {
        "data file contents": run_cfg(tiny_dir, other_data, built, tmp_path / "r"),
        "prompt template": run_cfg(
            tiny_dir, small, built, tmp_path / "r", template_no_input="Q: {instruction}\nA: "
        ),
        "max_length (cache 96, run 64)": run_cfg(tiny_dir, small, built, tmp_path / "r", max_length=64),
    }
    for what, cfg in cases.items():
        with pytest.raises(UserError) as err:
            TeacherCache.open(built, tokenizer=tok, config=cfg)
        message = str(err.value)
        assert "\n" not in message and "does not match this run" in message and what in message, message

    changed = load_tokenizer(str(tiny_dir / "student"))
    changed.add_tokens(["<extra>"])
    with pytest.raises(UserError, match=r"tokenizer \(cache '\w+', run '\w+'\); vocabulary size"):
        TeacherCache.open(built, tokenizer=changed, config=ok)


def test_changed_tokens_are_caught_per_batch(tiny_dir, small, built):
    """Even past the manifest checks, a batch whose tokens differ from the cached ones is refused."""
    ds, _ = dataset(tiny_dir, small)
    batch = ds.batch([0, 1])
    batch["input_ids"][1, 2] += 1
    with pytest.raises(UserError, match="example 1's tokens differ"):
        TeacherCache.open(built).signal_for(batch)


def test_unfinished_cache_is_refused_and_resume_equals_uninterrupted(tiny_dir, small, built, tmp_path):
    out = tmp_path / "cache"
    cfg = cache_cfg(tiny_dir, small, out)

    def interrupt_after_two(shard: int) -> None:
        if shard == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_cache(cfg, on_shard=interrupt_after_two)
    assert sorted(p.name for p in out.glob("shard-*")) == [
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]
    (out / "shard-00002.tmp").write_bytes(b"half-written")  # as a kill mid-write would leave
    with pytest.raises(UserError, match="unfinished"):
        TeacherCache.open(out)
    with pytest.raises(UserError, match="--resume"):
        build_cache(cfg)
    with pytest.raises(UserError, match="different k"):
        build_cache(cache_cfg(tiny_dir, small, out, top_k=3), resume=True)

    before = (out / "shard-00000.safetensors").stat().st_mtime_ns
    build_cache(cfg, resume=True)
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == before  # kept, not recomputed
    shards = sorted(p.name for p in built.glob("shard-*.safetensors"))
    assert shards == sorted(p.name for p in out.glob("shard-*.safetensors")) and len(shards) == 4
    for name in shards:
        assert (out / name).read_bytes() == (built / name).read_bytes(), name
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (built, out))
    for m in (a, b):
        m.pop("build_seconds_this_session")
    assert a == b


def test_options_and_objectives_that_cannot_run_sparse_are_refused(tiny_dir, small, built, tmp_path):
    with pytest.raises(ValueError, match="not both"):
        cache_cfg(tiny_dir, small, tmp_path / "x", top_k=4, top_fraction=0.1)
    with pytest.raises(
        UserError, match=r"cannot train from a sparse --teacher-cache \(objectives that can: .*slim"
    ):
        run_cfg(tiny_dir, small, built, tmp_path / "r", objective="rkl")
    with pytest.raises(UserError, match=r"no manifest\.json"):
        TeacherCache.open(tmp_path)


def kdtool_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "kdtool", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_cli_cache_then_distill_without_a_teacher(tiny_dir, small, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from kdtool import train_setup
    from kdtool.cli import app

    def no_teacher(*args, **kwargs):
        raise AssertionError("a model other than the student was loaded")

    cache = tmp_path / "cache"
    args = ["--data", str(small), "--max-length", str(MAX_LENGTH), "--no-progress"]
    teacher_args = ["--teacher", str(tiny_dir / "teacher"), "--output", str(cache)]
    result = CliRunner().invoke(app, ["cache-logits", *teacher_args, *args])
    assert result.exit_code == 0, result.output
    assert "bytes/token" in result.output and (cache / "manifest.json").is_file()
    # Through the real entry point: a second build into the same folder is one clear line.
    again = kdtool_cli("cache-logits", *teacher_args, *args)
    assert again.returncode == 1 and "already holds a complete cache" in again.stderr
    assert "Traceback" not in again.stderr

    real_load = train_setup.load_model
    monkeypatch.setattr(
        train_setup,
        "load_model",
        lambda name, *a, **kw: real_load(name, *a, **kw) if "student" in name else no_teacher(),
    )
    for objective in ("slim", "fkl"):
        out = tmp_path / objective
        result = CliRunner().invoke(
            app,
            [
                "distill", "--objective", objective, "--student", str(tiny_dir / "student"),
                "--teacher", str(tiny_dir / "teacher"),  # given, but the cache wins: never loaded
                "--teacher-cache", str(cache), "--output", str(out), "--max-steps", "3",
                "--batch-size", "4", "--log-every", "1", *args,
            ],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in records if "loss" in r and "lr" in r]
        assert len(steps) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
        assert "kl" in steps[-1]
        assert "eval_loss" in records[-1]  # the held-out split of --data is in the cache too
        assert AutoModelForCausalLM.from_pretrained(out) is not None


def test_cache_logits_takes_the_data_side_fields_of_a_distill_config(tmp_path):
    from kdtool.cli_cache import _from_config_file

    config = tmp_path / "run.yaml"
    config.write_text(
        "objective: slim\nteacher: T\nstudent: S\ndata: d.jsonl\nmax-length: 128\n"
        'template_no_input: "Q: {instruction}\\nA: "\nlr: 0.001\n'
    )
    assert _from_config_file(config) == {
        "teacher": "T",
        "data": "d.jsonl",
        "max_length": 128,
        "template_no_input": "Q: {instruction}\nA: ",
    }


def test_a_cache_records_the_chat_template_a_run_must_share():
    """Chat records are rendered with the tokenizer's chat template: a cache built with one template
    does not match a run rendering with another (or with --template alpaca)."""
    from kdtool.cache.config import describe_mismatch, identity
    from kdtool.data_config import DataConfig
    from kdtool.synthetic import build_tokenizer

    tok = build_tokenizer()
    data = Path(__file__)  # any file: only its fingerprint is read
    plain = identity(tok, DataConfig(data=str(data)))
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    chat = identity(tok, DataConfig(data=str(data)))
    alpaca = identity(tok, DataConfig(data=str(data), template="alpaca"))
    assert plain["chat_template_fingerprint"] is None and chat["chat_template_fingerprint"]
    assert any("chat template" in m for m in describe_mismatch(plain, chat))
    assert any("--template" in m for m in describe_mismatch(chat, alpaca))
