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

import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from kdtool.objective import Metrics, Objective, rows_of_stats
from kdtool.teacher import TeacherSignal

# Two sizes (bytes of one fp32 [rows, V] block):
# * The *chunk* (``default_chunk_size``): the rows whose student logits exist at once and go through
#   the output-layer matmuls together. The rule is rows = clamp(budget / (V × 4 bytes), lo, 8192), with a
#   budget and a floor per device type:
#   - CPU: 64 MiB, at least 512 rows. From benchmarks/chunk_cpu.md (``python benchmarks/bench_chunk.py``:
#     one fkl step of the output layers with a lazy teacher, H = 256 / 512, 32–1,024-row chunks, one
#     process each, on the shared 2-core CPU): the fastest chunk was 1,024 rows at V = 16k, 256 at 32k
#     and 1,024 at 152k, with 512–1,024 rows within 7% of it everywhere but one noisy 16k point, while
#     32–128-row chunks were 13–100% slower at 16k and 32k and ≥ 30% slower at 152k (CPU time
#     +30%); the peak grows with the chunk (16k: 62 MiB at 32 rows, 466 MiB at 1,024). The budget alone
#     (64 MiB) gives 1,024 rows at 16k and 512 at 32k, but only 96 at 152k, 2.5× slower than the best:
#     hence the floor. The rule is within 10% of the fastest chunk's step time and below its peak at the
#     three V measured. Smaller ``--chunk-size`` values trade step time (up to 2× at 32 rows) for memory
#     (down to 1/7 of the peak at V = 16k).
#   - CUDA: 512 MiB (~880 rows at V = 152k), at least 128 rows: matmuls must amortise re-reading the
#     [V, H] weight three times per chunk (≳ 1k rows at H ≈ 1k on an H100). Reasoned, not measured
#     here (no GPU was lent; ``bench_chunk.py --device cuda`` measures it).
# * The *slice*: the rows the objective (and the teacher's output layer) sees at once inside a
#   chunk, i.e. its ~10 temporaries of [rows, V] (log-softmaxes, products, their gradients). On CPU
#   slices are far faster than whole chunks: for fkl over 2048 × 16k logits, loss + backward took
#   0.8 s of CPU in 128–256-row slices vs 1.6 s in ≥ 512-row ones with 1 thread, and the best wall
#   time with 2 threads came at 384 rows (24 MiB). Temporaries of ≥ 32 MiB are served by fresh
#   mmaps (glibc's largest mmap threshold) whose every page faults in; smaller ones reuse the heap.
#   Hence 12 MiB per intra-op thread, capped below 32 MiB. On CUDA one slice = one chunk.
CHUNK_BUDGET_BYTES = {"cpu": 64 * 2**20, "cuda": 512 * 2**20}
CHUNK_MIN_ROWS = {"cpu": 512, "cuda": 128}
CPU_SLICE_BYTES_PER_THREAD = 12 * 2**20
CPU_SLICE_MAX_BYTES = 28 * 2**20
MIN_CHUNK_ROWS = 16
MAX_CHUNK_ROWS = 8192


def _rows_for(budget: int, vocab_size: int, floor: int = MIN_CHUNK_ROWS) -> int:
    """clamp(budget / (4 V), floor, MAX_CHUNK_ROWS), rounded down to a multiple of 16 rows."""
    rows = budget // (4 * max(vocab_size, 1))
    return int(min(MAX_CHUNK_ROWS, max(floor, rows // MIN_CHUNK_ROWS * MIN_CHUNK_ROWS)))


def default_chunk_size(vocab_size: int, device: torch.device | str = "cpu") -> int:
    """Rows per chunk: one fp32 ``[chunk, V]`` block of about ``CHUNK_BUDGET_BYTES`` of the device
    type, at least ``CHUNK_MIN_ROWS`` of it (devices other than CPU take CUDA's; see above)."""
    kind = torch.device(device).type
    kind = kind if kind in CHUNK_BUDGET_BYTES else "cuda"
    return _rows_for(CHUNK_BUDGET_BYTES[kind], vocab_size, CHUNK_MIN_ROWS[kind])


def slice_size(vocab_size: int, chunk_size: int, device: torch.device | str = "cpu") -> int:
    """Rows the objective sees at once inside a chunk (≤ ``chunk_size``); see the budgets above."""
    if torch.device(device).type != "cpu":
        return chunk_size
    budget = min(CPU_SLICE_BYTES_PER_THREAD * torch.get_num_threads(), CPU_SLICE_MAX_BYTES)
    return min(chunk_size, _rows_for(budget, vocab_size))


@dataclass(frozen=True)
class LinearParts:
    """What the fused path needs from an output layer: ``logits = post(h @ weight.T + bias)``.

    Attributes:
        weight: ``[V', H]`` (V' ≥ the shared vocabulary; rows past it are padding). For tied
            embeddings this is the embedding parameter itself, so its gradient adds to the
            embedding's.
        bias: ``[V']`` or ``None``.
        post: element-wise logit post-processing (logit scaling, final soft-capping), or ``None``.
    """

    weight: Tensor
    bias: Tensor | None = None
    post: Callable[[Tensor], Tensor] | None = None


@runtime_checkable
class HasLinearParts(Protocol):
    """An output head that declares its linear map (see ``kdtool.models.LogitHead``)."""

    def linear_parts(self) -> LinearParts | None: ...


def linear_parts(head: Any) -> LinearParts | None:
    """The linear map inside ``head``, or ``None`` when it is an opaque callable.

    A plain ``nn.Linear`` (not a subclass with its own ``forward``, e.g. a LoRA wrapper) and any
    object with ``linear_parts()`` qualify; everything else takes the checkpoint path.
    """
    if isinstance(head, HasLinearParts):
        return head.linear_parts()
    if isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward:
        return LinearParts(head.weight, head.bias)
    return None


def token_loss_sum(
    objective: Objective,
    student_hidden: Tensor,
    student_head: Callable[[Tensor], Tensor],
    teacher: TeacherSignal,
    labels: Tensor,
    vocab_size: int,
    chunk_size: int | None = None,
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
        chunk_size: rows per chunk; ``None`` = ``default_chunk_size(vocab_size, device)``.

    Returns:
        ``(loss_sum, metric_sums)``: the loss sum is differentiable w.r.t. ``student_hidden``
        and the head's parameters; metric (sum, count) pairs are added over chunks. N = 0 gives
        a loss of 0 whose gradient is finite (zero).
    """
    plan = _plan(objective, student_hidden, teacher, labels, vocab_size, chunk_size)

    parts = linear_parts(student_head)
    params = [student_hidden] + ([parts.weight, parts.bias] if parts else _module_params(student_head))
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in params)
    if parts is not None and needs_grad:
        loss = _FusedLinearLoss.apply(student_hidden, parts.weight, parts.bias, parts.post, plan)
    elif needs_grad:
        loss = _checkpointed_loss(student_hidden, student_head, plan)
    else:
        (loss,) = _no_grad_losses(student_hidden, student_head, [plan])
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
    plans = [_plan(o, student_hidden, teacher, labels, vocab_size, chunk_size) for o in objectives.values()]
    losses = _no_grad_losses(student_hidden, student_head, plans)
    return {
        name: (loss, plan.metrics or {}) for name, loss, plan in zip(objectives, losses, plans, strict=True)
    }


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


# --------------------------------------------------------------------------- internals


@dataclass
class _Plan:
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

    def add_metrics(self, metrics: Metrics) -> None:
        detached = {k: (s.detach(), c.detach()) for k, (s, c) in metrics.items()}
        if self.metrics is None:
            self.metrics = detached
            return
        for k, (s, c) in detached.items():
            s0, c0 = self.metrics.get(k, (torch.zeros_like(s), torch.zeros_like(c)))
            self.metrics[k] = (s0 + s, c0 + c)


def _plan(
    objective: Objective,
    student_hidden: Tensor,
    teacher: TeacherSignal,
    labels: Tensor,
    vocab_size: int,
    chunk_size: int | None,
) -> _Plan:
    if chunk_size is None:
        chunk_size = default_chunk_size(vocab_size, student_hidden.device)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    plan = _Plan(
        objective,
        teacher,
        labels,
        vocab_size,
        _chunks(student_hidden.shape[0], chunk_size),
        slice_size(vocab_size, chunk_size, student_hidden.device),
    )
    plan.stats = _batch_stats(objective, teacher, labels, plan.chunks)
    return plan


def _chunks(n: int, size: int) -> list[slice]:
    # N = 0 still runs one empty chunk, so the objective reports its metric names and the loss
    # keeps its autograd connection to the inputs (a finite, zero gradient).
    return [slice(start, min(start + size, n)) for start in range(0, n, size)] or [slice(0, 0)]


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


def _compute_dtype(hidden: Tensor) -> torch.dtype:
    """The dtype the output-layer matmul runs in: autocast's when it is on, else the input's."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device) and hidden.is_floating_point():
        return torch.get_autocast_dtype(device)
    return hidden.dtype


class _FusedLinearLoss(torch.autograd.Function):
    """loss = Σ_rows token_losses(post(h W[:V]ᵀ + b[:V])), gradients computed in forward per chunk."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,  # [N, H]
        weight: Tensor,  # [V', H]
        bias: Tensor | None,  # [V']
        post: Callable[[Tensor], Tensor] | None,
        plan: _Plan,
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
            for part in _chunks(h.shape[0], plan.slice_rows):
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
    z: Tensor, post: Callable[[Tensor], Tensor] | None, plan: _Plan, teacher: TeacherSignal, rows: slice
) -> tuple[Tensor, Tensor]:
    """One slice's loss sum and d(loss)/d(z), by a local autograd pass on ``[s, V]`` only."""
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


def _checkpointed_loss(hidden: Tensor, head: Callable[[Tensor], Tensor], plan: _Plan) -> Tensor:
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


def _no_grad_losses(hidden: Tensor, head: Callable[[Tensor], Tensor], plans: list[_Plan]) -> list[Tensor]:
    """Evaluation: chunked, with nothing kept for backward. The plans share the rows, the chunks
    and the teacher, so each chunk's logits of both models are built once for all of them."""
    first = plans[0]
    sums: list[list[Tensor]] = [[] for _ in plans]
    with torch.no_grad():
        for chunk in first.chunks:
            # In slices, like the fused path: each probe's [rows, V] temporaries stay below the slice
            # budget on CPU (whole 1,024-row chunks at V = 16k made evaluation the run's RSS peak).
            for part in _chunks(chunk.stop - chunk.start, first.slice_rows):
                rows = slice(chunk.start + part.start, chunk.start + part.stop)
                logits = head(hidden[rows])[..., : first.vocab_size]  # [s, V]
                teacher = first.teacher_rows(rows)
                for plan, parts in zip(plans, sums, strict=True):
                    losses, metrics = plan.losses(logits, teacher, rows)
                    plan.add_metrics(metrics)
                    parts.append(losses.sum())
    # Added chunk after chunk, in order: the same float result as one objective on its own.
    return [functools.reduce(operator.add, parts) for parts in sums]
