"""Token-level loss engine: from final hidden states at the valid positions to a loss sum.

Objectives are written on ``[N, V]`` logits; this module decides how many logits exist at once.
A naive step holds full-vocabulary logits of both models for all N tokens, plus their softmaxes
and the gradient (at V = 152k, N = 8k that is ~5 GB per fp32 copy). Here the N rows are cut into
chunks of ``chunk_size`` rows, and at most one ``[chunk, V]`` block of logits per model exists at
a time:

* **fused path** (the output layer is an ``nn.Linear``, or exposes ``linear_parts()``): a custom
  autograd function computes, chunk by chunk, the student logits, the teacher's logits for the
  same rows, the per-token losses and, by a local autograd pass on that chunk only, the gradient
  w.r.t. the chunk's logits; it immediately contracts that gradient into the gradients of the
  hidden states ``[N, H]`` and of the head's weight ``[V, H]`` (and bias). The logits are then
  freed. ``backward`` only scales the stored gradients. This is the approach of Liger Kernel's
  fused linear losses; it costs the same three matmuls as the plain path (no recomputation).
* **checkpoint path** (any other callable head): each chunk runs under
  ``torch.utils.checkpoint``, so its logits are recomputed in backward. Correct for arbitrary
  heads, but it recomputes the student and teacher logits (two extra matmuls per chunk).

Objectives that need batch statistics (``token_stats`` overridden, e.g. ATKD's quantile) get a
first pass over the chunks for their per-token statistics; ``batch_stats`` then sees all N rows,
so the result is exactly that of the unchunked computation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from kdtool.fused import FusedLinearLoss, checkpointed_loss, no_grad_losses
from kdtool.heads import linear_parts
from kdtool.loss_plan import make_plan
from kdtool.objective import Metrics, Objective
from kdtool.teacher import TeacherSignal


def token_loss_sum(
    objective: Objective,
    student_hidden: Tensor,
    student_head: Callable[[Tensor], Tensor],
    teacher: TeacherSignal,
    labels: Tensor,
    vocab_size: int,
    chunk_size: int | None = None,
    stats: dict[str, Tensor] | None = None,
) -> tuple[Tensor, Metrics]:
    """Sum of the objective's per-token losses over N valid positions, chunk by chunk.

    Args:
        objective: a token-level objective.
        student_hidden: ``[N, H]`` student final hidden states at the valid positions.
        student_head: the student's output layer ``[n, H] -> [n, V']`` (V' ≥ vocab_size): an
            ``nn.Linear``, an object with ``linear_parts()`` (fused path), or any callable
            (checkpoint path, slower).
        teacher: signal for the same N rows (dense, lazy hidden-state, sparse, or none); it is
            treated as a constant (no gradient flows into it).
        labels: ``[N]`` target ids.
        vocab_size: the vocabulary both models share; logits past it are dropped.
        chunk_size: rows per chunk; ``None`` = ``default_chunk_size(vocab_size, device, H)``.
        stats: per-token inputs ``[N]`` of the objective besides the teacher (a step's, e.g.
            rollout advantages), added to its ``batch_stats`` and sliced per chunk like them.

    Returns:
        ``(loss_sum, metric_sums)``: the loss sum is differentiable w.r.t. ``student_hidden``
        and the head's parameters; metric (sum, count) pairs are added over chunks. N = 0 gives
        a loss of 0 whose gradient is finite (zero).
    """
    plan = make_plan(objective, student_hidden, teacher, labels, vocab_size, chunk_size, stats)

    parts = linear_parts(student_head)
    params = [student_hidden] + ([parts.weight, parts.bias] if parts else _module_params(student_head))
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in params)
    if parts is not None and needs_grad:
        loss = FusedLinearLoss.apply(student_hidden, parts.weight, parts.bias, parts.post, plan)
    elif needs_grad:
        loss = checkpointed_loss(student_hidden, student_head, plan)
    else:
        (loss,) = no_grad_losses(student_hidden, student_head, [plan])
    return loss, plan.metrics or {}


def _module_params(head: Callable[[Tensor], Tensor]) -> list[Tensor]:
    # An opaque head may train on its own (LoRA on the output layer only: the hidden states are
    # then constant, yet the loss needs a gradient for the head's adapter).
    return list(head.parameters()) if isinstance(head, nn.Module) else []


def token_loss_sums(
    objectives: dict[str, Objective],
    student_hidden: Tensor,
    student_head: Callable[[Tensor], Tensor],
    teacher: TeacherSignal,
    labels: Tensor,
    vocab_size: int,
    chunk_size: int | None = None,
) -> dict[str, tuple[Tensor, Metrics]]:
    """Evaluation: the loss sums of several objectives on the same N rows, without gradients.

    Each chunk's student logits, and the teacher's logits for the same rows, are computed once and
    handed to every objective in turn, so k held-out probes cost one output-layer pass per model,
    not k. Arguments as in ``token_loss_sum``, with a name -> objective mapping.

    Returns:
        ``{name: (loss_sum, metric_sums)}``, for each objective what ``token_loss_sum`` returns for
        it alone under ``torch.no_grad()`` (the same chunks, the same arithmetic).
    """
    if not objectives:
        return {}
    # One plan per distinct objective object: a name given the same object twice (the held-out
    # `loss` probe of an fkl run *is* the fkl probe) is computed once.
    unique = list({id(o): o for o in objectives.values()}.values())
    plans = [make_plan(o, student_hidden, teacher, labels, vocab_size, chunk_size) for o in unique]
    losses = no_grad_losses(student_hidden, student_head, plans)
    by_id = {id(o): (loss, plan.metrics or {}) for o, loss, plan in zip(unique, losses, plans, strict=True)}
    return {name: by_id[id(o)] for name, o in objectives.items()}


def plain_token_loss_sum(
    objective: Objective,
    student_hidden: Tensor,
    student_head: Callable[[Tensor], Tensor],
    teacher: TeacherSignal,
    labels: Tensor,
    vocab_size: int,
) -> tuple[Tensor, Metrics]:
    """The unchunked reference: full ``[N, V]`` logits of both models at once, plain autograd.

    Same arguments and result as ``token_loss_sum``; used by the tests and the benchmark.
    """
    teacher_rows = teacher.rows(slice(None)) if not teacher.is_empty else teacher
    stats = objective.batch_stats(objective.token_stats(teacher_rows, labels))
    logits = student_head(student_hidden)[..., :vocab_size]  # [N, V]
    losses, metrics = objective.token_losses(logits, teacher_rows, labels, stats)
    if losses.numel() == 0:
        return logits.sum() * 0.0, metrics
    return losses.sum(), metrics
