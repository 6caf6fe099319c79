"""A loss plan: everything the chunked engine's loops need besides the student's tensors.

``make_plan`` cuts the N valid rows into chunks, runs the objective's first pass (per-token
statistics, ``token_stats`` → ``batch_stats``) over them, and carries the metric sums the loops add.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kdtool.chunking import default_chunk_size, row_chunks, slice_size
from kdtool.objective import Metrics, Objective, rows_of_stats
from kdtool.teacher import LazySignal, TeacherSignal


@dataclass
class LossPlan:
    """Everything the per-chunk loop needs besides the student's tensors."""

    objective: Objective
    teacher: TeacherSignal
    labels: Tensor
    vocab_size: int
    chunks: list[slice]
    slice_rows: int
    stats: dict[str, Any] | None = None
    metrics: Metrics | None = None

    def teacher_rows(self, rows: slice) -> TeacherSignal:
        """The teacher's signal for some rows; a lazy signal builds its logits here, for those rows only."""
        return self.teacher.rows(rows) if not self.teacher.is_empty else self.teacher

    def losses(self, logits: Tensor, teacher: TeacherSignal, rows: slice) -> tuple[Tensor, Metrics]:
        """Per-token losses ``[c]`` for ``rows`` (global row indices) given their logits and teacher."""
        assert self.stats is not None
        stats = rows_of_stats(self.stats, rows)
        return self.objective.token_losses(logits, teacher, self.labels[rows], stats)

    def losses_and_grad(
        self, logits: Tensor, teacher: TeacherSignal, rows: slice
    ) -> tuple[Tensor, Metrics, Tensor] | None:
        """The objective's closed form for ``rows`` (``token_losses_and_grad``), or ``None``."""
        assert self.stats is not None
        stats = rows_of_stats(self.stats, rows)
        return self.objective.token_losses_and_grad(logits, teacher, self.labels[rows], stats)

    def add_metrics(self, metrics: Metrics) -> None:
        detached = {k: (s.detach(), c.detach()) for k, (s, c) in metrics.items()}
        if self.metrics is None:
            self.metrics = detached
            return
        for k, (s, c) in detached.items():
            s0, c0 = self.metrics.get(k, (torch.zeros_like(s), torch.zeros_like(c)))
            self.metrics[k] = (s0 + s, c0 + c)


def make_plan(
    objective: Objective,
    student_hidden: Tensor,
    teacher: TeacherSignal,
    labels: Tensor,
    vocab_size: int,
    chunk_size: int | None,
    extra_stats: dict[str, Tensor] | None = None,
) -> LossPlan:
    if chunk_size is None:
        chunk_size = default_chunk_size(vocab_size, student_hidden.device, student_hidden.shape[-1])
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    plan = LossPlan(
        objective,
        teacher,
        labels,
        vocab_size,
        row_chunks(student_hidden.shape[0], chunk_size),
        slice_size(vocab_size, chunk_size, student_hidden.device, teacher_hidden_size(teacher)),
    )
    plan.stats = {**_batch_stats(objective, teacher, labels, plan.chunks), **(extra_stats or {})}
    return plan


def teacher_hidden_size(teacher: TeacherSignal) -> int:
    """A lazy teacher's hidden size (its output layer runs per slice); 0 for any other signal."""
    return teacher.hidden.shape[-1] if isinstance(teacher, LazySignal) else 0


def _overrides_token_stats(objective: Objective) -> bool:
    return type(objective).token_stats is not Objective.token_stats


def _batch_stats(
    objective: Objective, teacher: TeacherSignal, labels: Tensor, chunks: list[slice]
) -> dict[str, Any]:
    """First pass: per-token statistics chunk by chunk, concatenated, then ``batch_stats``."""
    if not _overrides_token_stats(objective):
        return objective.batch_stats({})
    parts: dict[str, list[Tensor]] = {}
    with torch.no_grad():
        for rows in chunks:
            teacher_rows = teacher.rows(rows) if not teacher.is_empty else teacher
            for k, v in objective.token_stats(teacher_rows, labels[rows]).items():
                parts.setdefault(k, []).append(v)
    return objective.batch_stats({k: torch.cat(v) for k, v in parts.items()})
