"""The token step: what one micro-batch of reference data costs.

The trainer asks a step for a micro-batch ``stream`` over the data loader and for each micro-batch's
``loss``: ``(loss_sum, count, metric_sums)``, the sum over its target tokens, which the trainer
divides by the count of the whole accumulated step. ``TokenStep`` serves every token-level
objective on the data's references; ``kdtool.onpolicy.RolloutStep`` serves objectives that learn
from the student's samples.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from kdtool.context import StepContext
from kdtool.engine import token_loss_sum, token_loss_sums
from kdtool.heads import hidden_states, output_head
from kdtool.objective import Metrics, Objective
from kdtool.responses import ResponseStream
from kdtool.streams import Batch, LoaderStream, MicroBatchStream
from kdtool.targets import shifted_targets
from kdtool.teacher import NoSignal, TeacherSignal


class Step(Protocol):
    objective: Objective[Any]

    def stream(self, loader: Any, ctx: StepContext) -> MicroBatchStream: ...
    def loss(self, ctx: StepContext, batch: Batch) -> tuple[Tensor, Tensor, Metrics]: ...


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def teacher_signal(ctx: StepContext, batch: Batch, mask: Tensor) -> TeacherSignal:
    """The teacher's signal for the valid positions of ``batch``, in ``mask``'s row-major order:
    sparse rows from the cache, or the teacher's hidden states with its output layer (lazy)."""
    if ctx.teacher_cache is not None:
        return ctx.teacher_cache.signal_for(batch)
    if ctx.teacher is None:
        return NoSignal()
    with torch.no_grad(), ctx.autocast():
        if ctx.teacher_forward is not None:
            hidden = ctx.teacher_forward(batch["input_ids"], batch["attention_mask"])
        else:
            hidden = hidden_states(ctx.teacher, batch["input_ids"], batch["attention_mask"])
        rows = hidden[:, :-1][mask]  # [N, H]
    return TeacherSignal.lazy(rows, output_head(ctx.teacher), ctx.vocab_size)


def token_loss(
    objective: Objective[Any], ctx: StepContext, batch: Batch, stats: dict[str, Tensor] | None = None
) -> tuple[Tensor, Tensor, Metrics]:
    """Loss *sum* over the batch's target tokens, the token count, and metric sums.

    ``stats``: per-token inputs ``[N]`` of the objective besides the teacher (rollout statistics),
    in the row-major order of the target positions.
    """
    batch = to_device(batch, ctx.device)
    labels, mask = shifted_targets(batch["labels"])
    teacher = teacher_signal(ctx, batch, mask) if objective.needs_teacher else NoSignal()
    with ctx.autocast():
        hidden = hidden_states(ctx.student, batch["input_ids"], batch["attention_mask"])[:, :-1][mask]
        loss_sum, metrics = token_loss_sum(
            objective,
            hidden,  # [N, H]
            output_head(ctx.student),
            teacher,
            labels[mask],
            ctx.vocab_size,
            ctx.chunk_size,
            stats=stats,
        )
    return loss_sum.float(), mask.sum(), metrics


class TokenStep:
    """A token-level objective on the data's reference responses, or on sampled ones."""

    def __init__(self, objective: Objective[Any]):
        self.objective = objective

    def stream(self, loader: Any, ctx: StepContext) -> MicroBatchStream:
        """The data's batches as they are, or with sampled responses (``kdtool.responses``)."""
        if ctx.settings.samples_responses:
            return ResponseStream(loader, ctx)
        return LoaderStream(loader)

    def loss(self, ctx: StepContext, batch: Batch) -> tuple[Tensor, Tensor, Metrics]:
        return token_loss(self.objective, ctx, batch)


def eval_micro_batch(
    probes: dict[str, Objective[Any]], ctx: StepContext, batch: Batch
) -> tuple[dict[str, Tensor], Tensor]:
    """Held-out loss *sums* of several token-level objectives on one batch, and its token count.

    One teacher forward and one student forward serve every probe (the probes differ only in
    the loss they compute from the same two sets of logits); the teacher is run only if some
    probe needs it. Each sum equals ``token_loss(probe, ...)`` under ``no_grad``.
    """
    batch = to_device(batch, ctx.device)
    labels, mask = shifted_targets(batch["labels"])
    needs_teacher = any(p.needs_teacher for p in probes.values())
    teacher = teacher_signal(ctx, batch, mask) if needs_teacher else NoSignal()
    with torch.no_grad(), ctx.autocast():
        hidden = hidden_states(ctx.student, batch["input_ids"], batch["attention_mask"])[:, :-1][mask]
        sums = token_loss_sums(
            probes, hidden, output_head(ctx.student), teacher, labels[mask], ctx.vocab_size, ctx.chunk_size
        )
    return {name: loss_sum.float() for name, (loss_sum, _) in sums.items()}, mask.sum()
