"""Build a cache: one teacher pass over the data, written shard by shard.

Shards cover fixed example ranges and are written atomically, each stamped with the build's
settings, so an interrupted build resumes at the first missing shard and ends byte-identical to
an uninterrupted one. The manifest says ``"complete": false`` until the last shard is on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from kdtool.cache.codec import bytes_per_token, dtype_name, index_dtype
from kdtool.cache.config import CacheConfig, identity
from kdtool.cache.manifest import FORMAT, MANIFEST, read_manifest, write_manifest
from kdtool.cache.teacher_pass import encode_shard
from kdtool.data import TokenizedDataset, load_examples
from kdtool.errors import UserError
from kdtool.sparse import DEFAULT_TOP_FRACTION, top_k_count

SHARD_BYTES = 256 * 2**20  # default shard size bound: a shard is assembled in memory before writing


def _save_shard(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Write a shard so that it either exists complete or not at all."""
    tmp = path.with_suffix(".tmp")
    # One metadata key holding sorted JSON: safetensors writes several keys in hash order,
    # which would make identical shards differ byte-wise.
    save_file(tensors, str(tmp), metadata={"kdtool": json.dumps(metadata, sort_keys=True)})
    os.chmod(tmp, 0o644)  # safetensors creates files private to the owner; a cache is meant to be shared
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _shard_ok(path: Path, stamp: str, lo: int, hi: int) -> bool:
    """A finished shard from *this* build (same settings, same example range)."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("kdtool", "{}"))
    except Exception:  # a foreign or damaged file is simply rebuilt
        return False
    return (
        meta.get("settings") == stamp
        and meta.get("first_example") == str(lo)
        and meta.get("num_examples") == str(hi - lo)
    )


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _settings(cfg: CacheConfig, tokenizer: Any, model: Any, vocab: int, k: int) -> dict[str, Any]:
    per_token = bytes_per_token(k, cfg.value_dtype, vocab)
    per_shard = cfg.examples_per_shard or max(1, SHARD_BYTES // (per_token * cfg.max_length))
    return {
        "format": FORMAT,
        "teacher": cfg.teacher,
        "teacher_class": type(model).__name__,
        "teacher_dtype": dtype_name(next(model.parameters()).dtype),
        "data": str(cfg.data),
        **identity(tokenizer, cfg),
        "template": cfg.prompt_template().to_dict(),
        "k": k,
        "top_fraction": cfg.top_fraction if cfg.top_k is None else None,
        "top_k": cfg.top_k,
        "value_dtype": cfg.value_dtype,
        "index_dtype": dtype_name(index_dtype(vocab)),
        "bytes_per_token": per_token,
        "dense_fp16_bytes_per_token": 2 * vocab,
        "examples_per_shard": per_shard,
    }


def _prepare_output(
    out: Path, settings: dict[str, Any], resume: bool, overwrite: bool
) -> dict[str, Any] | None:
    """Refuse to clobber; on ``resume`` check the settings. Returns the existing manifest, if any."""
    manifest_path = out / MANIFEST
    if out.exists() and any(out.iterdir()) and not overwrite:
        if not manifest_path.is_file():
            raise UserError(f"output directory {out} is not empty and holds no cache; pass --overwrite")
        old = read_manifest(manifest_path)
        if not resume:
            state = "a complete" if old.get("complete") else "an unfinished"
            raise UserError(
                f"{out} already holds {state} cache; pass --resume to continue it or --overwrite to replace it"
            )
        # The data *path* may differ (a moved file); its contents are checked by fingerprint.
        changed = [key for key, value in settings.items() if key != "data" and old.get(key) != value]
        if changed:
            raise UserError(f"--resume: {out} was built with different {', '.join(changed)}")
        return old
    if overwrite and out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return None


def build_cache(
    cfg: CacheConfig,
    resume: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
    on_shard: Callable[[int], None] | None = None,
) -> Path:
    """One teacher pass over ``cfg.data``; writes (or completes) the cache in ``cfg.output``.

    Args:
        cfg: what to cache and how.
        resume: continue an unfinished cache with the same settings (finished shards are kept).
        overwrite: replace whatever is in the output directory.
        console: where the progress bar goes.
        on_shard: called with each shard number once it is on disk (tests interrupt here).

    Returns:
        The cache directory.
    """
    from kdtool.heads import output_head
    from kdtool.models import compute_dtype, load_model, load_tokenizer, resolve_device

    console = console or Console(stderr=True)
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(cfg.teacher, cfg.trust_remote_code)
    examples = load_examples(
        cfg.data, cfg.prompt_field, cfg.response_field, cfg.skip_bad_lines, template=cfg.prompt_template()
    )
    dataset = TokenizedDataset(examples, tokenizer, cfg.max_length, cfg.max_prompt_length, cfg.template)
    compute = compute_dtype(cfg.dtype, device)
    model = load_model(cfg.teacher, device, compute, trust_remote_code=cfg.trust_remote_code)
    model = model.eval().requires_grad_(False)
    vocab = len(tokenizer)
    if model.get_output_embeddings().weight.shape[0] < vocab:
        raise UserError(f"teacher output layer is smaller than its tokenizer ({vocab:,} tokens)")
    k = top_k_count(vocab, cfg.top_fraction or DEFAULT_TOP_FRACTION, cfg.top_k)
    if cfg.top_k is None and cfg.top_fraction is None:
        cfg = cfg.model_copy(update={"top_fraction": DEFAULT_TOP_FRACTION})
    out = Path(cfg.output)
    settings = _settings(cfg, tokenizer, model, vocab, k)
    _prepare_output(out, settings, resume, overwrite)
    write_manifest(out, {**settings, "complete": False})
    stamp = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    n = len(dataset)
    per_shard = settings["examples_per_shard"]
    spans = [(s, min(s + per_shard, n)) for s in range(0, n, per_shard)]
    shards: list[dict[str, Any]] = []
    head = output_head(model)
    started = time.perf_counter()
    with _progress(cfg.progress, console) as bar:
        task = bar.add_task("cache-logits", total=n)
        for i, (lo, hi) in enumerate(spans):
            path = out / shard_name(i)
            if not (path.is_file() and _shard_ok(path, stamp, lo, hi)):
                tensors = encode_shard(
                    model,
                    head,
                    dataset.items[lo:hi],
                    dataset.pad_id,
                    cfg,
                    vocab,
                    k,
                    device,
                    lambda m: bar.advance(task, m),
                )
                meta = {"settings": stamp, "first_example": str(lo), "num_examples": str(hi - lo)}
                _save_shard(path, tensors, meta)
            else:
                bar.advance(task, hi - lo)
            with safe_open(str(path), "pt") as f:
                tokens = int(f.get_tensor("counts").sum())
            shards.append(
                {"file": path.name, "first_example": lo, "num_examples": hi - lo, "num_tokens": tokens}
            )
            if on_shard is not None:
                on_shard(i)
    total_tokens = sum(s["num_tokens"] for s in shards)
    on_disk = sum((out / s["file"]).stat().st_size for s in shards)
    manifest = {
        **settings,
        "num_examples": n,
        "num_tokens": total_tokens,
        "bytes_on_disk": on_disk,
        "bytes_on_disk_per_token": round(on_disk / max(total_tokens, 1), 2),
        "fraction_of_dense_fp16": round(
            settings["bytes_per_token"] / settings["dense_fp16_bytes_per_token"], 5
        ),
        "shards": shards,
        "kdtool_version": _version(),
        "build_seconds_this_session": round(time.perf_counter() - started, 2),
        "complete": True,
    }
    write_manifest(out, manifest)
    return out


def _version() -> str:
    from kdtool import __version__

    return __version__


def _progress(enabled: bool, console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]cache-logits"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("examples"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
    )
