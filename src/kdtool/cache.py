"""The sparse teacher-logit cache: run the teacher once, train many students without it.

Layout of a cache directory::

    manifest.json              settings, fingerprints, sizes, shard list ("complete": true when done)
    shard-00000.safetensors    examples [0, S): values [n, k], indices [n, k], log_normalizer [n],
    shard-00001.safetensors    counts [S] (response tokens per example), token_hash [S]
    ...

For every example of the data file (file order, so the trainer's ``index`` finds it) the cache
holds one row per *target* position (``labels[1:] != -100``, the trainer's shifted mask) in
position order: the teacher's top-k logits (sorted descending), their vocabulary ids, and the
full-vocabulary ``logsumexp`` (4 bytes, so true teacher probabilities stay known). Shards
cover fixed example ranges and are written atomically, so an interrupted build resumes at the
first missing shard and ends byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from kdtool.data import (
    IGNORE_INDEX,
    Encoded,
    Template,
    TokenizedDataset,
    collate,
    file_fingerprint,
    load_examples,
)
from kdtool.errors import UserError
from kdtool.files import load_json
from kdtool.sparse import DEFAULT_TOP_FRACTION, top_k_count, top_k_logits
from kdtool.teacher import TeacherSignal

FORMAT = "kdtool-teacher-cache/1"
MANIFEST = "manifest.json"
VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
Q8 = "q8"  # 8-bit codes with a per-token offset and scale (see quantize_q8)
HEAD_ROWS = 1024  # teacher logits are built this many rows at a time ([rows, V] fp32 at most)
SHARD_BYTES = 256 * 2**20  # default shard size bound: a shard is assembled in memory before writing


class CacheConfig(BaseModel):
    """Everything ``kdtool cache-logits`` needs; the data-side fields must equal the training run's."""

    model_config = ConfigDict(extra="forbid")

    teacher: str = Field(..., description="Teacher: local directory or hub id.")
    data: str = Field(..., description="Training data file (the one `kdtool distill --data` gets).")
    output: str = Field(..., description="Cache directory.")
    top_fraction: float | None = Field(None, gt=0, le=1, description="k = ceil(top_fraction·V) (0.05).")
    top_k: int | None = Field(None, gt=0, description="Store exactly k logits per token.")
    batch_size: int = Field(8, gt=0)
    max_length: int = Field(512, gt=8)
    max_prompt_length: int | None = None
    prompt_field: str | None = None
    response_field: str | None = None
    skip_bad_lines: bool = False
    template_no_input: str | None = None
    template_with_input: str | None = None
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Teacher compute dtype: auto = bf16 on CUDA, fp32 on CPU."
    )
    value_dtype: Literal["float16", "bfloat16", "float32", "q8"] = Field(
        "float16",
        description="Stored logit dtype; q8 = 8-bit codes + per-token offset/scale (7.5% of dense).",
    )
    examples_per_shard: int | None = Field(
        None, gt=0, description="Examples per shard (default: about 256 MiB of rows at full length)."
    )
    trust_remote_code: bool = Field(
        False, description="Let a teacher whose config has an auto_map run its own Python code."
    )
    progress: bool = True

    @model_validator(mode="after")
    def _check(self) -> CacheConfig:
        if self.top_fraction is not None and self.top_k is not None:
            raise ValueError("give --top-fraction or --top-k, not both")
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length must be smaller than max_length")
        return self

    def template(self) -> Template:
        default = Template()
        return Template(
            self.template_no_input or default.no_input, self.template_with_input or default.with_input
        )


# ---------------------------------------------------------------- fingerprints


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides tokenization: the fast tokenizer's definition (or the vocabulary)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        for volatile in ("version", "truncation", "padding"):  # call-time settings, not the tokenizer
            spec.pop(volatile, None)
    else:
        spec = {"vocab": sorted(tokenizer.get_vocab().items())}
    spec["eos_token_id"] = tokenizer.eos_token_id
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def token_hash(ids: Sequence[int]) -> int:
    """64-bit hash of an example's token ids (a per-batch check that the tokens are the cached ones)."""
    digest = hashlib.blake2b(torch.tensor(list(ids), dtype=torch.int64).numpy().tobytes(), digest_size=8)
    return int.from_bytes(digest.digest(), "little", signed=True)


def identity(
    tokenizer: Any,
    data: str | Path,
    template: Template,
    max_length: int,
    max_prompt_length: int | None,
    prompt_field: str | None,
    response_field: str | None,
    skip_bad_lines: bool,
) -> dict[str, Any]:
    """The fields a cache and a training run must agree on (name -> value)."""
    return {
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer),
        "data_fingerprint": file_fingerprint(data),
        "template_fingerprint": template.fingerprint(),
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "prompt_field": prompt_field,
        "response_field": response_field,
        "skip_bad_lines": skip_bad_lines,
    }


def describe_mismatch(cached: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    names = {
        "tokenizer_fingerprint": "tokenizer",
        "vocab_size": "vocabulary size",
        "data_fingerprint": "data file contents",
        "template_fingerprint": "prompt template",
    }
    return [
        f"{names.get(key, key)} (cache {cached.get(key)!r}, run {value!r})"
        for key, value in wanted.items()
        if cached.get(key) != value
    ]


# ---------------------------------------------------------------- building


def _atomic_write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


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


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def index_dtype(vocab_size: int) -> torch.dtype:
    """The smallest dtype holding every vocabulary id."""
    return torch.uint16 if vocab_size <= 65_536 else torch.int32


def indices_to(indices: Tensor, device: torch.device) -> Tensor:
    """Stored vocabulary ids ``[n, k]`` as int64 on ``device``, widened there: the transfer moves the
    compact stored dtype (2 or 4 bytes, not 8) and the host does no per-element work. uint16
    travels as its int16 bit pattern (CUDA kernels for uint16 are sparse) and is unmasked after."""
    if indices.dtype == torch.uint16:
        return indices.view(torch.int16).to(device).long() & 0xFFFF
    return indices.to(device).long()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@torch.no_grad()
def teacher_top_k(
    model: Any, head: Callable[[Tensor], Tensor], batch: dict[str, Tensor], vocab: int, k: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k teacher logits for the batch's target positions, in the trainer's order.

    Returns ``(values [N, k] fp32, indices [N, k] int64, log_normalizer [N] fp32)``, rows in
    the row-major order of ``labels[:, 1:] != -100``.
    """
    from kdtool.heads import hidden_states

    mask = batch["labels"][:, 1:] != IGNORE_INDEX  # [B, T-1]
    hidden = hidden_states(model, batch["input_ids"], batch["attention_mask"])[:, :-1][mask]  # [N, H]
    parts = [top_k_logits(head(rows)[..., :vocab].float(), k) for rows in hidden.split(HEAD_ROWS)]
    if not parts:
        return torch.empty(0, k), torch.empty(0, k, dtype=torch.long), torch.empty(0)
    values, indices, lse = (torch.cat(p) for p in zip(*parts, strict=True))
    return values, indices, lse


def encode_shard(
    model: Any,
    head: Callable[[Tensor], Tensor],
    items: Sequence[Encoded],
    pad_id: int,
    cfg: CacheConfig,
    vocab: int,
    k: int,
    device: torch.device,
    advance: Callable[[int], None],
) -> dict[str, Tensor]:
    """Run the teacher over one shard's examples (longest first, to pad less) and lay the rows out
    in example order. Rows are converted to their storage dtypes batch by batch, so a shard never
    holds fp32 values or int64 ids in memory."""
    per_example: list[dict[str, Tensor]] = [{} for _ in items]
    order = sorted(range(len(items)), key=lambda i: -len(items[i].input_ids))
    for start in range(0, len(order), cfg.batch_size):
        chosen = order[start : start + cfg.batch_size]
        batch = {k_: v.to(device) for k_, v in collate([items[i] for i in chosen], pad_id).items()}
        values, indices, lse = teacher_top_k(model, head, batch, vocab, k)
        stored = {**encode_values(values, cfg.value_dtype), "log_normalizer": lse.float()}
        stored["indices"] = indices.to(index_dtype(vocab))
        counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).tolist()
        bounds = torch.tensor([0, *counts]).cumsum(0).tolist()
        for j, i in enumerate(chosen):
            per_example[i] = {name: t[bounds[j] : bounds[j + 1]].cpu() for name, t in stored.items()}
        advance(len(chosen))
    tensors = {name: torch.cat([rows[name] for rows in per_example]).contiguous() for name in per_example[0]}
    tensors["counts"] = torch.tensor([len(rows["log_normalizer"]) for rows in per_example], dtype=torch.int64)
    tensors["token_hash"] = torch.tensor([token_hash(it.input_ids) for it in items], dtype=torch.int64)
    return tensors


def encode_values(values: Tensor, value_dtype: str) -> dict[str, Tensor]:
    """fp32 top-k logits ``[n, k]`` in their storage form (``values`` and, for q8, offset/scale)."""
    if value_dtype == Q8:
        return dict(zip(("values", "value_offset", "value_scale"), quantize_q8(values), strict=True))
    check_representable(values, value_dtype)
    return {"values": values.to(VALUE_DTYPES[value_dtype])}


def quantize_q8(values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """8-bit codes for each row's top-k logits: ``[n, k] fp32 -> (codes uint8, offset [n], scale [n])``.

    Code 0 is −inf; codes 1..255 span the row's finite range [min, max] uniformly, so the
    error is at most (max − min) / 508 per logit and the descending order is kept.
    """
    finite = torch.isfinite(values)
    low = torch.where(finite, values, float("inf")).min(-1).values  # [n]
    high = torch.where(finite, values, float("-inf")).max(-1).values
    low = torch.where(torch.isfinite(low), low, 0.0)
    scale = ((high - low) / 254).clamp(min=torch.finfo(torch.float32).tiny)
    scale = torch.where(torch.isfinite(scale), scale, 1.0)
    codes = ((values - low.unsqueeze(-1)) / scale.unsqueeze(-1)).round().clamp(0, 254) + 1
    codes = torch.where(finite, codes, 0.0)
    return codes.to(torch.uint8), low.float(), scale.float()


def dequantize_q8(codes: Tensor, offset: Tensor, scale: Tensor) -> Tensor:
    """Inverse of ``quantize_q8``: ``[n, k]`` fp32 logits (−inf for code 0)."""
    values = offset.unsqueeze(-1) + (codes.float() - 1) * scale.unsqueeze(-1)
    return values.masked_fill(codes == 0, float("-inf"))


def check_representable(values: Tensor, value_dtype: str) -> None:
    if value_dtype != "float16":
        return
    finite = values[torch.isfinite(values)]
    if finite.numel() and float(finite.abs().max()) > torch.finfo(torch.float16).max:
        raise UserError(
            f"teacher logits reach {float(finite.abs().max()):.3g}, beyond float16; use --value-dtype bfloat16"
        )


def _settings(cfg: CacheConfig, tokenizer: Any, model: Any, vocab: int, k: int) -> dict[str, Any]:
    template = cfg.template()
    value_bytes = 1 if cfg.value_dtype == Q8 else torch.finfo(VALUE_DTYPES[cfg.value_dtype]).bits // 8
    per_token = 4 + (8 if cfg.value_dtype == Q8 else 0)  # fp32 log-partition (+ q8 offset and scale)
    index_bytes = torch.iinfo(index_dtype(vocab)).bits // 8
    bytes_per_token = k * (value_bytes + index_bytes) + per_token
    per_shard = cfg.examples_per_shard or max(1, SHARD_BYTES // (bytes_per_token * cfg.max_length))
    return {
        "format": FORMAT,
        "teacher": cfg.teacher,
        "teacher_class": type(model).__name__,
        "teacher_dtype": dtype_name(next(model.parameters()).dtype),
        "data": str(cfg.data),
        **identity(
            tokenizer,
            cfg.data,
            template,
            cfg.max_length,
            cfg.max_prompt_length,
            cfg.prompt_field,
            cfg.response_field,
            cfg.skip_bad_lines,
        ),
        "template": template.to_dict(),
        "k": k,
        "top_fraction": cfg.top_fraction if cfg.top_k is None else None,
        "top_k": cfg.top_k,
        "value_dtype": cfg.value_dtype,
        "index_dtype": dtype_name(index_dtype(vocab)),
        "bytes_per_token": bytes_per_token,
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
    from kdtool.models import load_model, load_tokenizer, resolve_device

    console = console or Console(stderr=True)
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(cfg.teacher, cfg.trust_remote_code)
    examples = load_examples(
        cfg.data, cfg.prompt_field, cfg.response_field, cfg.skip_bad_lines, template=cfg.template()
    )
    dataset = TokenizedDataset(examples, tokenizer, cfg.max_length, cfg.max_prompt_length)
    compute = (
        torch.bfloat16 if cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda") else None
    )
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
    _atomic_write_json(out / MANIFEST, {**settings, "complete": False})
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
    _atomic_write_json(out / MANIFEST, manifest)
    return out


# The fields a reader relies on, and their JSON types.
MANIFEST_FIELDS: dict[str, type] = {"format": str, "vocab_size": int, "k": int, "value_dtype": str}
TYPE_NAMES = {str: "a string", int: "an integer"}


def read_manifest(path: Path) -> dict[str, Any]:
    """A cache's ``manifest.json``, checked enough that reading the cache cannot fail on it.

    Raises:
        UserError: unreadable, not JSON, or a field missing or of the wrong type (``path: reason``).
    """
    manifest = load_json(path)
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:  # another format: the caller says so; nothing else to check
        return manifest
    for key, kind in MANIFEST_FIELDS.items():
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            raise UserError(f"{path}: field {key!r} is missing or not {TYPE_NAMES[kind]}")
    if manifest.get("complete"):
        shards = manifest.get("shards")
        if not isinstance(shards, list) or not all(_is_shard_entry(s) for s in shards):
            raise UserError(f"{path}: field 'shards' must be a list of {{'file': name, ...}} in the cache")
    return manifest


def _is_shard_entry(entry: Any) -> bool:
    # a plain file name: a manifest must not point the reader outside its own directory
    name = entry.get("file") if isinstance(entry, dict) else None
    return isinstance(name, str) and name == Path(name).name and name not in ("", ".", "..")


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _version() -> str:
    from kdtool import __version__

    return __version__


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


# ---------------------------------------------------------------- reading


class TeacherCache:
    """A finished cache opened for training: ``signal_for(batch)`` gives the batch's sparse teacher.

    Shards are memory-mapped; only the rows of the batch's examples are read.
    """

    def __init__(self, root: Path, manifest: dict[str, Any]):
        self.root, self.manifest = root, manifest
        self.vocab_size: int = manifest["vocab_size"]
        self.k: int = manifest["k"]
        self._handles: dict[int, Any] = {}
        shard_of, start, count, hashes = [], [], [], []
        for i in range(len(manifest["shards"])):
            counts, shard_hashes = self._shard_index(i)
            hashes.extend(shard_hashes)
            offsets = [0]
            for c in counts[:-1]:
                offsets.append(offsets[-1] + c)
            shard_of += [i] * len(counts)
            start += offsets
            count += counts
        self._shard_of, self._start, self._count, self._hash = shard_of, start, count, hashes

    @classmethod
    def open(cls, path: str | Path, tokenizer: Any = None, config: Any = None) -> TeacherCache:
        """Open a cache and, given the run's tokenizer and ``DistillConfig``, check it matches.

        Raises:
            UserError: no/unfinished cache, or one built for another tokenizer, data file,
                template or length limit (one line naming what differs).
        """
        root = Path(path)
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            raise UserError(f"--teacher-cache {root}: no {MANIFEST} (build one with `kdtool cache-logits`)")
        manifest = read_manifest(manifest_path)
        if manifest.get("format") != FORMAT:
            raise UserError(f"--teacher-cache {root}: unknown cache format {manifest.get('format')!r}")
        if not manifest.get("complete"):
            raise UserError(
                f"--teacher-cache {root} is unfinished; complete it with `kdtool cache-logits --resume`"
            )
        if tokenizer is not None and config is not None:
            default = Template()
            template = Template(
                config.template_no_input or default.no_input, config.template_with_input or default.with_input
            )
            wanted = identity(
                tokenizer,
                config.data,
                template,
                config.max_length,
                config.max_prompt_length,
                config.prompt_field,
                config.response_field,
                config.skip_bad_lines,
            )
            diffs = describe_mismatch(manifest, wanted)
            if diffs:
                raise UserError(f"--teacher-cache {root} does not match this run: {'; '.join(diffs)}")
        return cls(root, manifest)

    def __len__(self) -> int:
        return len(self._count)

    def _shard_path(self, i: int) -> Path:
        return self.root / self.manifest["shards"][i]["file"]

    def _shard_index(self, i: int) -> tuple[list[int], list[int]]:
        """Response tokens and token hash per example of shard ``i`` (one line per damaged shard)."""
        try:
            f = self._shard(i)
            return f.get_tensor("counts").tolist(), f.get_tensor("token_hash").tolist()
        except SafetensorError as exc:
            raise UserError(f"{self._shard_path(i)}: {_first_line(exc)}") from exc

    def _shard(self, i: int) -> Any:
        if i not in self._handles:
            path = self._shard_path(i)
            try:
                self._handles[i] = safe_open(str(path), "pt")
            except FileNotFoundError as exc:
                raise UserError(f"{path}: shard listed in {MANIFEST} is missing") from exc
            except (SafetensorError, OSError) as exc:
                raise UserError(f"{path}: not a readable safetensors shard ({_first_line(exc)})") from exc
        return self._handles[i]

    def rows(self, example: int) -> tuple[Tensor, Tensor, Tensor]:
        try:
            return self._rows(example)
        except SafetensorError as exc:  # e.g. a shard truncated after it was opened
            path = self._shard_path(self._shard_of[example])
            raise UserError(f"{path}: {_first_line(exc)}") from exc

    def _rows(self, example: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(values [n, k], indices [n, k], log_normalizer [n])`` of one example: values in their
        stored float dtype (q8 decoded to fp32), indices in their stored integer dtype."""
        f = self._shard(self._shard_of[example])
        a = self._start[example]
        b = a + self._count[example]
        values = f.get_slice("values")[a:b]
        if self.manifest["value_dtype"] == Q8:
            values = dequantize_q8(values, f.get_slice("value_offset")[a:b], f.get_slice("value_scale")[a:b])
        return values, f.get_slice("indices")[a:b], f.get_slice("log_normalizer")[a:b]

    def signal_for(self, batch: dict[str, Tensor]) -> TeacherSignal:
        """The sparse teacher for ``batch``'s target positions, in the row-major order of
        ``labels[:, 1:] != -100`` (what the trainer's token engine uses).

        Args:
            batch: ``input_ids``/``attention_mask``/``labels`` ``[B, T]`` and ``index`` ``[B]``
                (the examples' positions in the data file).
        """
        device = batch["labels"].device
        # One device-to-host copy per tensor for the whole batch, not one sync per row.
        labels, ids = batch["labels"][:, 1:].cpu(), batch["input_ids"].cpu()
        n_rows = (labels != IGNORE_INDEX).sum(1).tolist()
        lengths = batch["attention_mask"].sum(1).tolist()
        parts = []
        for row, example in enumerate(batch["index"].tolist()):
            if n_rows[row] == 0:  # nothing to score (e.g. a masked stand-in batch)
                continue
            self._check(example, n_rows[row], ids[row, : lengths[row]].tolist())
            parts.append(self.rows(example))
        if not parts:
            values = torch.empty(
                0, self.k, dtype=VALUE_DTYPES.get(self.manifest["value_dtype"], torch.float32)
            )
            return TeacherSignal.sparse(
                values.to(device),
                torch.empty(0, self.k, dtype=torch.long, device=device),
                self.vocab_size,
                torch.empty(0, device=device),
            )
        values, indices, lse = (torch.cat(p) for p in zip(*parts, strict=True))
        return TeacherSignal.sparse(
            values.to(device), indices_to(indices, device), self.vocab_size, lse.to(device)
        )

    def _check(self, example: int, n_rows: int, ids: list[int]) -> None:
        if not 0 <= example < len(self._count):
            raise UserError(
                f"--teacher-cache {self.root} holds {len(self._count)} examples, not example {example}"
            )
        if self._count[example] != n_rows or self._hash[example] != token_hash(ids):
            raise UserError(
                f"--teacher-cache {self.root}: example {example}'s tokens differ from the cached ones "
                "(was the data, tokenizer, template or max length changed?)"
            )
