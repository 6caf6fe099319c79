"""What ``kdtool cache-logits`` is asked to build, and the fingerprints that tie a cache to the
tokenizer, data file and settings a training run must share with it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from kdtool.data import Template, file_fingerprint


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
    """``what (cache X, run Y)`` for each identity field where the cache and the run differ."""
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
