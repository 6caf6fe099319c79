"""How cached rows are stored: the value dtypes (fp16, bf16, fp32 or 8-bit ``q8`` codes), the
vocabulary-id dtype, and a batch's fp32 rows to their stored tensors and back.

Pure tensor code: no files, no models, nothing else of the cache.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kdtool.errors import UserError

VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
Q8 = "q8"  # 8-bit codes with a per-token offset and scale (see quantize_q8)


def index_dtype(vocab_size: int) -> torch.dtype:
    """The smallest dtype holding every vocabulary id."""
    return torch.uint16 if vocab_size <= 65_536 else torch.int32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def bytes_per_token(k: int, value_dtype: str, vocab_size: int) -> int:
    """Stored bytes per cached token: k values and ids, the fp32 log-partition (+ q8 offset, scale)."""
    value_bytes = 1 if value_dtype == Q8 else torch.finfo(VALUE_DTYPES[value_dtype]).bits // 8
    per_token = 4 + (8 if value_dtype == Q8 else 0)
    index_bytes = torch.iinfo(index_dtype(vocab_size)).bits // 8
    return k * (value_bytes + index_bytes) + per_token


def encode_rows(
    values: Tensor, indices: Tensor, log_normalizer: Tensor, value_dtype: str, vocab_size: int
) -> dict[str, Tensor]:
    """A batch's rows in their stored form (the tensor names of a shard).

    Args:
        values: top-k logits ``[n, k]`` fp32, sorted descending.
        indices: their vocabulary ids ``[n, k]`` int64.
        log_normalizer: full-vocabulary ``logsumexp`` ``[n]``.
    """
    stored = {**encode_values(values, value_dtype), "log_normalizer": log_normalizer.float()}
    stored["indices"] = indices.to(index_dtype(vocab_size))
    return stored


def decode_rows(shard: Any, start: int, stop: int, value_dtype: str) -> tuple[Tensor, Tensor, Tensor]:
    """Rows ``[start, stop)`` of an open safetensors shard: ``(values [n, k], indices [n, k],
    log_normalizer [n])``, values in their stored float dtype (q8 decoded to fp32), indices in
    their stored integer dtype. Only those rows are read."""
    values = shard.get_slice("values")[start:stop]
    if value_dtype == Q8:
        offset, scale = (shard.get_slice(name)[start:stop] for name in ("value_offset", "value_scale"))
        values = dequantize_q8(values, offset, scale)
    return values, shard.get_slice("indices")[start:stop], shard.get_slice("log_normalizer")[start:stop]


def indices_to(indices: Tensor, device: torch.device) -> Tensor:
    """Stored vocabulary ids ``[n, k]`` as int64 on ``device``, widened there: the transfer moves the
    compact stored dtype (2 or 4 bytes, not 8) and the host does no per-element work. uint16
    travels as its int16 bit pattern (CUDA kernels for uint16 are sparse) and is unmasked after."""
    if indices.dtype == torch.uint16:
        return indices.view(torch.int16).to(device).long() & 0xFFFF
    return indices.to(device).long()


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
    """Refuse fp16 storage of logits beyond its range (they would be stored as ±inf)."""
    if value_dtype != "float16":
        return
    finite = values[torch.isfinite(values)]
    if finite.numel() and float(finite.abs().max()) > torch.finfo(torch.float16).max:
        raise UserError(
            f"teacher logits reach {float(finite.abs().max()):.3g}, beyond float16; use --value-dtype bfloat16"
        )
