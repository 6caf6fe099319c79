"""The engine's two differentiable paths and its evaluation path, chunk by chunk.

* ``FusedLinearLoss`` (the head is a linear map): per chunk, the student logits, the objective's
  per-token losses and d(loss)/d(logits) (the objective's closed form, ``token_losses_and_grad``,
  where it has one, else a local autograd pass on that chunk only), contracted at
  once into the gradients of the hidden states and of the head's weight (and bias); the logits are
  then freed and ``backward`` only scales the stored gradients (Liger Kernel's fused linear losses).
* ``checkpointed_loss`` (any other head): each chunk under ``torch.utils.checkpoint``.
* ``no_grad_losses``: evaluation, several objectives sharing each chunk's logits.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from kdtool.chunking import row_chunks
from kdtool.loss_plan import LossPlan
from kdtool.objective import Metrics
from kdtool.teacher import TeacherSignal


def _compute_dtype(hidden: Tensor) -> torch.dtype:
    """The dtype the output-layer matmul runs in: autocast's when it is on, else the input's."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device) and hidden.is_floating_point():
        return torch.get_autocast_dtype(device)
    return hidden.dtype


class FusedLinearLoss(torch.autograd.Function):
    """loss = Σ_rows token_losses(post(h W[:V]ᵀ + b[:V])), gradients computed in forward per chunk."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,  # [N, H]
        weight: Tensor,  # [V', H]
        bias: Tensor | None,  # [V']
        post: Callable[[Tensor], Tensor] | None,
        plan: LossPlan,
    ) -> Tensor:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        vocab, device = plan.vocab_size, hidden.device.type
        dtype = _compute_dtype(hidden)
        # One cast of the weight per call (autocast would cast it on every chunk's matmul).
        w = weight[:vocab].to(dtype)  # [V, H]
        b = bias[:vocab].to(dtype) if bias is not None else None
        grad_h = torch.empty_like(hidden) if need_h else None
        # Full V' rows: padded rows past the shared vocabulary get an exact zero gradient.
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b and bias is not None else None
        longest = max(rows.stop - rows.start for rows in plan.chunks)
        z_buffer = hidden.new_empty((longest, vocab), dtype=dtype)  # reused by every chunk
        total: Tensor | None = None
        for rows in plan.chunks:
            h = hidden[rows].to(dtype)  # [c, H]
            z = z_buffer[: h.shape[0]]  # [c, V]
            with torch.autocast(device, enabled=False):
                torch.addmm(b, h, w.t(), out=z) if b is not None else torch.mm(h, w.t(), out=z)
            for part in row_chunks(h.shape[0], plan.slice_rows):
                glob = slice(rows.start + part.start, rows.start + part.stop)
                loss, dz = _loss_and_logit_grad(z[part], post, plan, plan.teacher_rows(glob), glob)
                total = loss if total is None else total + loss
                z[part] = dz  # the logits of these rows are spent: the buffer now holds dL/dz
            with torch.autocast(device, enabled=False):
                if grad_h is not None:
                    _write_or_copy(grad_h[rows], z, w)  # [c, H] = [c, V] @ [V, H]
                if grad_w is not None:
                    _accumulate_mm(grad_w[:vocab], z.t(), h)  # [V, H] += [V, c] @ [c, H]
                if grad_b is not None:
                    grad_b[:vocab] += z.sum(0).to(grad_b.dtype)
        ctx.grads = (grad_h, grad_w, grad_b)
        assert total is not None
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.grads is None:
            raise RuntimeError("the chunked token loss can be backpropagated only once")
        grads, ctx.grads = ctx.grads, None
        # The trainer scales the loss sum by 1 / token count, so grad_output is rarely 1: scale
        # the stored gradients in place rather than allocating a second [V, H] buffer.
        scaled = tuple(g.mul_(grad_output.to(g.dtype)) if g is not None else None for g in grads)
        return (*scaled, None, None)


def _loss_and_logit_grad(
    z: Tensor, post: Callable[[Tensor], Tensor] | None, plan: LossPlan, teacher: TeacherSignal, rows: slice
) -> tuple[Tensor, Tensor]:
    """One slice's loss sum and d(loss)/d(z): the objective's closed form when it has one (and no
    ``post`` map sits between z and the logits), else a local autograd pass on ``[s, V]`` only."""
    if post is None:
        with torch.no_grad():
            closed = plan.losses_and_grad(z, teacher, rows)
        if closed is not None:
            losses, metrics, dz = closed
            plan.add_metrics(metrics)
            return losses.sum(), dz
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        logits = post(z) if post is not None else z
        losses, metrics = plan.losses(logits, teacher, rows)
        plan.add_metrics(metrics)
        loss = losses.sum()
        if not loss.requires_grad:  # e.g. an empty slice: the loss is a constant
            return loss.detach(), torch.zeros_like(z)
        (dz,) = torch.autograd.grad(loss, z, allow_unused=True, materialize_grads=True)
    return loss.detach(), dz


def _write_or_copy(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out = a @ b without a temporary when dtypes allow."""
    if out.dtype == a.dtype == b.dtype and out.is_contiguous():
        torch.mm(a, b, out=out)
    else:
        out.copy_(a @ b)


def _accumulate_mm(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b, in place when dtypes allow (no [V, H] temporary)."""
    if acc.dtype == a.dtype == b.dtype:
        acc.addmm_(a, b)
    else:  # bf16 compute into an fp32 gradient: keep the accumulation in fp32
        acc.add_(a @ b)


def checkpointed_loss(hidden: Tensor, head: Callable[[Tensor], Tensor], plan: LossPlan) -> Tensor:
    """Opaque heads: per-chunk activation checkpointing (logits recomputed in backward)."""
    total: Tensor | None = None
    for rows in plan.chunks:
        box: list[Metrics] = []

        def chunk_loss(h: Tensor, rows: slice = rows, box: list[Metrics] = box) -> Tensor:
            logits = head(h)[..., : plan.vocab_size]
            losses, metrics = plan.losses(logits, plan.teacher_rows(rows), rows)
            box.append(metrics)  # the recomputation in backward appends again; only [0] is read
            return losses.sum()

        loss = checkpoint(chunk_loss, hidden[rows], use_reentrant=False)
        plan.add_metrics(box[0])
        total = loss if total is None else total + loss
    assert total is not None
    return total


def no_grad_losses(hidden: Tensor, head: Callable[[Tensor], Tensor], plans: list[LossPlan]) -> list[Tensor]:
    """Evaluation: chunked, with nothing kept for backward. The plans share the rows, the chunks
    and the teacher, so each chunk's logits of both models are built once for all of them."""
    first = plans[0]
    sums: list[list[Tensor]] = [[] for _ in plans]
    with torch.no_grad():
        for chunk in first.chunks:
            # In slices, like the fused path: each probe's [rows, V] temporaries stay below the slice
            # budget on CPU (whole 1,024-row chunks at V = 16k made evaluation the run's RSS peak).
            for part in row_chunks(chunk.stop - chunk.start, first.slice_rows):
                rows = slice(chunk.start + part.start, chunk.start + part.stop)
                logits = head(hidden[rows])[..., : first.vocab_size]  # [s, V]
                teacher = first.teacher_rows(rows)
                for plan, parts in zip(plans, sums, strict=True):
                    losses, metrics = plan.losses(logits, teacher, rows)
                    plan.add_metrics(metrics)
                    parts.append(losses.sum())
    # Added chunk after chunk, in order: the same float result as one objective on its own.
    return [functools.reduce(operator.add, parts) for parts in sums]
