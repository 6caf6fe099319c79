"""The teacher's pass over the data: its top-k logits for a batch's target positions, and one
shard's examples laid out in the shard's stored form."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from kdtool.cache.codec import encode_rows
from kdtool.cache.config import CacheConfig, token_hash
from kdtool.data import Encoded, collate
from kdtool.sparse import top_k_logits
from kdtool.targets import shifted_targets

HEAD_ROWS = 1024  # teacher logits are built this many rows at a time ([rows, V] fp32 at most)


@torch.no_grad()
def teacher_top_k(
    model: Any, head: Callable[[Tensor], Tensor], batch: dict[str, Tensor], vocab: int, k: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k teacher logits for the batch's target positions, in the trainer's order.

    Returns ``(values [N, k] fp32, indices [N, k] int64, log_normalizer [N] fp32)``, rows in
    the row-major order of ``labels[:, 1:] != -100``.
    """
    from kdtool.heads import hidden_states

    _, mask = shifted_targets(batch["labels"])  # [B, T-1]
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
        stored = encode_rows(*teacher_top_k(model, head, batch, vocab, k), cfg.value_dtype, vocab)
        counts = shifted_targets(batch["labels"])[1].sum(1).tolist()
        bounds = torch.tensor([0, *counts]).cumsum(0).tolist()
        for j, i in enumerate(chosen):
            per_example[i] = {name: t[bounds[j] : bounds[j + 1]].cpu() for name, t in stored.items()}
        advance(len(chosen))
    tensors = {name: torch.cat([rows[name] for rows in per_example]).contiguous() for name in per_example[0]}
    tensors["counts"] = torch.tensor([len(rows["log_normalizer"]) for rows in per_example], dtype=torch.int64)
    tensors["token_hash"] = torch.tensor([token_hash(it.input_ids) for it in items], dtype=torch.int64)
    return tensors
