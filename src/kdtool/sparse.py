"""Sparse (top-k) teacher signals: the k rule, dense → top-k, and student log-probs on a support.

Shared by ``kdtool cache-logits`` (which stores the top-k) and the objectives that read it
(``slim``), so a live teacher and a cache give an objective the same k and the same support.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from kdtool.divergence import upcast
from kdtool.teacher import DenseSignal, SparseSignal, TeacherSignal

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    from kdtool.lazy import torch

DEFAULT_TOP_FRACTION = 0.05


def top_k_count(vocab_size: int, top_fraction: float = DEFAULT_TOP_FRACTION, top_k: int | None = None) -> int:
    """How many teacher logits to keep per token: ``top_k`` if given, else ``⌈top_fraction·V⌉``.

    Clamped to ``[1, V]``.
    """
    k = top_k if top_k is not None else math.ceil(top_fraction * vocab_size - 1e-9)
    return max(1, min(int(k), vocab_size))


def top_k_logits(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The k largest logits per row, sorted descending, and each row's log-partition.

    Args:
        logits: ``[N, V]`` teacher logits.
        k: entries to keep.

    Returns:
        ``(values [N, k], indices [N, k] int64, log_normalizer [N] fp32)``; values keep the
        input dtype (the cache decides the storage dtype).
    """
    values, indices = logits.topk(min(k, logits.shape[-1]), dim=-1, sorted=True)
    return values, indices, torch.logsumexp(upcast(logits), dim=-1)


def sparsify(teacher: TeacherSignal, k: int) -> TeacherSignal:
    """The teacher's top-k as a sparse signal (``[N, k]`` values + int64 indices).

    A dense or lazy signal is cut to its top k (with its log-partition, so true teacher
    probabilities stay known); a sparse one keeps ``min(k, stored k)`` of its largest entries.
    """
    if isinstance(teacher, SparseSignal):
        values, indices = teacher.values, teacher.indices.long()
        if values.shape[-1] > k:  # keep the k largest of what was stored
            values, order = values.topk(k, dim=-1, sorted=True)
            indices = indices.gather(-1, order)
        return SparseSignal(values, indices, teacher.vocab_size, teacher.log_normalizer)
    if teacher.is_empty:
        raise ValueError("this objective needs a teacher, but no teacher signal was given")
    dense = teacher.rows(slice(None))  # materialises a lazy hidden-state signal
    assert isinstance(dense, DenseSignal)
    values, indices, lse = top_k_logits(dense.logits, k)
    return SparseSignal(values, indices, dense.vocab_size, lse)


def student_log_probs_at(student_logits: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Student log-probabilities at given vocabulary ids, without a full ``[N, V]`` log-softmax.

    Args:
        student_logits: ``[N, V]`` logits (upcast to ≥ fp32).
        indices: ``[N, m]`` vocabulary ids.

    Returns:
        ``(log q at indices [N, m], log-partition [N])``.
    """
    logits = upcast(student_logits)
    lse = torch.logsumexp(logits, dim=-1)  # [N]
    return logits.gather(-1, indices.long()) - lse.unsqueeze(-1), lse
