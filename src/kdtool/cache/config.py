"""What ``kdtool cache-logits`` is asked to build, and the fingerprints that tie a cache to the
tokenizer, data file and settings a training run must share with it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import ConfigDict, Field, model_validator

from kdtool.data_config import DataConfig
from kdtool.files import file_fingerprint


class CacheConfig(DataConfig):
    """Everything ``kdtool cache-logits`` needs; the data-side fields (``DataConfig``'s) must equal
    the training run's."""

    model_config = ConfigDict(extra="forbid")

    teacher: str = Field(..., description="Teacher: local directory or hub id.")
    output: str = Field(..., description="Cache directory.")
    top_fraction: float | None = Field(None, gt=0, le=1, description="k = ceil(top_fraction·V) (0.05).")
    top_k: int | None = Field(None, gt=0, description="Store exactly k logits per token.")
    batch_size: int = Field(8, gt=0)
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
        return self


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


def chat_template_fingerprint(tokenizer: Any) -> str | None:
    """The first 16 hex digits of the SHA-256 of the tokenizer's chat template (``None``: none)."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return None
    return hashlib.sha256(template.encode()).hexdigest()[:16]


def identity(tokenizer: Any, data: DataConfig) -> dict[str, Any]:
    """The fields a cache and a training run must agree on (name -> value)."""
    return {
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer),
        "data_fingerprint": file_fingerprint(data.data),
        "template_fingerprint": data.prompt_template().fingerprint(),
        "template_choice": data.template,
        "chat_template_fingerprint": chat_template_fingerprint(tokenizer),
        "max_length": data.max_length,
        "max_prompt_length": data.max_prompt_length,
        "prompt_field": data.prompt_field,
        "response_field": data.response_field,
        "skip_bad_lines": data.skip_bad_lines,
    }


def describe_mismatch(cached: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """``what (cache X, run Y)`` for each identity field where the cache and the run differ."""
    names = {
        "tokenizer_fingerprint": "tokenizer",
        "vocab_size": "vocabulary size",
        "data_fingerprint": "data file contents",
        "template_fingerprint": "prompt template",
        "template_choice": "--template",
        "chat_template_fingerprint": "chat template",
    }
    return [
        f"{names.get(key, key)} (cache {cached.get(key)!r}, run {value!r})"
        for key, value in wanted.items()
        if cached.get(key) != value
    ]
