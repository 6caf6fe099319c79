"""What one micro-batch costs: the bridge between the trainer loop and an objective.

The trainer only ever calls ``objective.batches(loader, ctx)`` and
``objective.micro_batch_loss(ctx, batch)``; token-level objectives use the defaults here,
on-policy ones (MiniLLM) override both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from kdtool.engine import token_loss_sum, token_loss_sums
from kdtool.models import hidden_states, output_head
from kdtool.objective import IGNORE_INDEX, Metrics
from kdtool.teacher import TeacherSignal

if TYPE_CHECKING:
    from kdtool.objective import Objective


@dataclass
class StepContext:
    """Everything an objective may need for one micro-batch (models, tokenizer, engine settings)."""

    student: Any
    teacher: Any | None
    teacher_cache: Any | None
    tokenizer: Any
    vocab_size: int
    device: torch.device
    chunk_size: int | None = None
    autocast_dtype: torch.dtype | None = None
    generator: torch.Generator | None = None
    config: Any = None
    extras: dict[str, Any] = field(default_factory=dict)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def default_batches(loader: Iterable[dict[str, Tensor]], ctx: StepContext) -> Iterator[dict[str, Tensor]]:
    return iter(loader)


def target_mask(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Shifted labels ``[B, T-1]`` and the mask of positions that have a target."""
    labels = batch["labels"][:, 1:]
    return labels, labels != IGNORE_INDEX


def teacher_signal(
    objective: Objective, ctx: StepContext, batch: dict[str, Tensor], mask: Tensor
) -> TeacherSignal:
    """The teacher's signal for the valid positions of ``batch``, in ``mask``'s row-major order."""
    if not objective.needs_teacher:
        return TeacherSignal.none()
    if ctx.teacher_cache is not None:
        return ctx.teacher_cache.signal_for(batch)
    forward = ctx.extras.get("teacher_forward") or (lambda ids, am: hidden_states(ctx.teacher, ids, am))
    with torch.no_grad(), ctx.autocast():
        hidden = forward(batch["input_ids"], batch["attention_mask"])[:, :-1][mask]  # [N, H]
    return TeacherSignal.lazy(hidden, output_head(ctx.teacher), ctx.vocab_size)


def token_micro_batch_loss(
    objective: Objective, ctx: StepContext, batch: dict[str, Tensor]
) -> tuple[Tensor, Tensor, Metrics]:
    """Loss *sum* over the batch's target tokens, the token count, and metric sums."""
    batch = to_device(batch, ctx.device)
    labels, mask = target_mask(batch)
    teacher = teacher_signal(objective, ctx, batch, mask)
    with ctx.autocast():
        hidden = hidden_states(ctx.student, batch["input_ids"], batch["attention_mask"])[:, :-1][
            mask
        ]  # [N, H]
        loss_sum, metrics = token_loss_sum(
            objective, hidden, output_head(ctx.student), teacher, labels[mask], ctx.vocab_size, ctx.chunk_size
        )
    return loss_sum.float(), mask.sum(), metrics


def eval_micro_batch(
    probes: dict[str, Objective], ctx: StepContext, batch: dict[str, Tensor]
) -> tuple[dict[str, Tensor], Tensor]:
    """Held-out loss *sums* of several token-level objectives on one batch, and its token count.

    One teacher forward and one student forward serve every probe (the probes differ only in
    the loss they compute from the same two sets of logits); the teacher is run only if some
    probe needs it. Each sum equals ``token_micro_batch_loss(probe, ...)`` under ``no_grad``.
    """
    batch = to_device(batch, ctx.device)
    labels, mask = target_mask(batch)
    needs = [p for p in probes.values() if p.needs_teacher]
    teacher = teacher_signal(needs[0], ctx, batch, mask) if needs else TeacherSignal.none()
    with torch.no_grad(), ctx.autocast():
        hidden = hidden_states(ctx.student, batch["input_ids"], batch["attention_mask"])[:, :-1][
            mask
        ]  # [N, H]
        sums = token_loss_sums(
            probes, hidden, output_head(ctx.student), teacher, labels[mask], ctx.vocab_size, ctx.chunk_size
        )
    return {name: loss_sum.float() for name, (loss_sum, _) in sums.items()}, mask.sum()


BatchFn = Callable[[Iterable[dict[str, Tensor]], StepContext], Iterator[dict[str, Tensor]]]
