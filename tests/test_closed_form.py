"""Closed-form gradients (``Objective.token_losses_and_grad``) against autograd on ``token_losses``.

Where an objective gives one, the engine's fused path uses it instead of a local autograd pass, so
it must give the same losses, metrics and d(Σ losses)/d(logits): here bit for bit (``torch.equal``),
for every registered objective, each option field's values, dense / sparse / masked teachers,
extreme logits and bf16 logits.
"""

from __future__ import annotations

import pytest
import torch

import kdtool
from kdtool.engine import plain_token_loss_sum, token_loss_sum
from kdtool.registry import available
from kdtool.teacher import TeacherSignal

N, V, K = 9, 33, 6

OPTION_VALUES = {"temperature": (2.0, 0.5), "ce_weight": (0.3,)}


def option_cases(name: str) -> list[dict[str, float]]:
    fields = available()[name].Options.model_fields
    cases: list[dict[str, float]] = [{}]
    for field, values in OPTION_VALUES.items():
        if field in fields:
            cases += [{field: v} for v in values]
    return cases


def teacher_kinds(name: str, opts: dict[str, float]) -> list[str]:
    cls = available()[name]
    if not cls.needs_teacher:
        return ["none"]
    return ["dense", "masked"] + (["sparse"] if cls.accepts_sparse(cls.Options(**opts)) else [])


CASES = [
    (name, opts, kind)
    for name, cls in sorted(available().items())
    if cls.scores_references
    for opts in option_cases(name)
    for kind in teacher_kinds(name, opts)
]


def teacher_of(kind: str, logits: torch.Tensor) -> TeacherSignal:
    if kind == "none":
        return TeacherSignal.none()
    if kind == "dense":
        return TeacherSignal.dense(logits)
    if kind == "masked":  # vocabulary entries the teacher gives probability exactly 0
        return TeacherSignal.dense(logits.masked_fill(torch.arange(V) % 4 == 0, float("-inf")))
    values, indices = logits.topk(K, dim=-1)
    return TeacherSignal.sparse(values, indices, V)


def inputs(scale: float, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(N, V, generator=g) * scale).to(dtype)
    teacher = torch.randn(N, V, generator=g) * scale
    labels = torch.randint(0, V, (N,), generator=g)
    return student, teacher, labels


def by_autograd(objective, student, teacher, labels, stats):
    z = student.detach().requires_grad_(True)
    losses, metrics = objective.token_losses(z, teacher, labels, stats)
    (grad,) = torch.autograd.grad(losses.sum(), z)
    return losses.detach(), metrics, grad


@pytest.mark.parametrize(("name", "opts", "kind"), CASES)
@pytest.mark.parametrize(
    ("scale", "dtype"), [(3.0, torch.float32), (1e4, torch.float32), (3.0, torch.bfloat16)]
)
def test_closed_form_equals_autograd_bit_for_bit(name, opts, kind, scale, dtype):
    objective = kdtool.get_objective(name, **opts)
    student, teacher_logits, labels = inputs(scale, dtype)
    teacher = teacher_of(kind, teacher_logits)
    stats = objective.batch_stats(objective.token_stats(teacher, labels))
    with torch.no_grad():
        closed = objective.token_losses_and_grad(student, teacher, labels, stats)
    if closed is None:
        return  # autograd on token_losses is the engine's path for these options
    losses, metrics, grad = closed
    ref_losses, ref_metrics, ref_grad = by_autograd(objective, student, teacher, labels, stats)
    assert not grad.requires_grad and grad.dtype == student.dtype and grad.shape == student.shape
    assert torch.equal(losses, ref_losses)
    assert torch.equal(grad, ref_grad)
    assert metrics.keys() == ref_metrics.keys()
    for key, (total, count) in metrics.items():
        assert torch.equal(total, ref_metrics[key][0]) and torch.equal(count, ref_metrics[key][1])


def test_fkl_has_a_closed_form_where_it_claims_one():
    """The comparison above is not vacuous: fkl without its CE term takes the closed form."""
    student, teacher_logits, labels = inputs(3.0, torch.float32)
    teacher = TeacherSignal.dense(teacher_logits)
    for opts in ({}, {"temperature": 2.0}):
        assert (
            kdtool.get_objective("fkl", **opts).token_losses_and_grad(student, teacher, labels, {})
            is not None
        )
    assert (
        kdtool.get_objective("fkl", ce_weight=0.3).token_losses_and_grad(student, teacher, labels, {}) is None
    )


def test_fused_engine_uses_the_closed_form_and_equals_the_plain_engine(monkeypatch):
    """The fused path never builds an autograd graph of fkl's loss (token_losses is not called
    with gradients on), and its result equals the unchunked autograd reference."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(N, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    head = torch.nn.Linear(5, V).double()
    teacher = TeacherSignal.dense(torch.randn(N, V, generator=g, dtype=torch.float64))
    labels = torch.randint(0, V, (N,), generator=g)
    objective = kdtool.get_objective("fkl", temperature=2.0)
    plain, _ = plain_token_loss_sum(objective, hidden, head, teacher, labels, V)
    plain_grads = torch.autograd.grad(plain, [hidden, head.weight, head.bias])

    original = type(objective).token_losses

    def no_graph(self, *args, **kwargs):
        assert not torch.is_grad_enabled(), "the fused path differentiated token_losses by autograd"
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(objective), "token_losses", no_graph)
    fused, _ = token_loss_sum(objective, hidden, head, teacher, labels, V, chunk_size=4)
    fused_grads = torch.autograd.grad(fused, [hidden, head.weight, head.bias])
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    for a, b in zip(fused_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_kl_without_autograd_masks_rows_only_where_needed():
    """``kl`` without autograd skips the p = 0 mask unless a row comes out NaN (CPU): dense rows
    mixed with rows the mask matters for give autograd's values bit for bit, and each row's value
    is the slow float64 sum over the teacher's support."""
    from kdtool.divergence import kl

    g = torch.Generator().manual_seed(3)
    log_p = torch.log_softmax(torch.randn(6, V, generator=g) * 3, -1)
    log_q = torch.log_softmax(torch.randn(6, V, generator=g) * 3, -1)
    log_p[1, ::3] = float("-inf")  # teacher zeros: 0 · ∞ without the mask
    log_p[1] -= torch.logsumexp(log_p[1], -1)
    log_q[2, 5] = float("-inf")  # the student misses a teacher token: KL = +inf
    log_p[3] = torch.log_softmax(torch.randn(V, generator=g) * 200, -1)  # p underflows to 0, finite logs
    log_p[4, 7] = float("nan")  # a NaN stays NaN
    cases = {"dense only": [0, 3, 5], "mixed": list(range(6))}
    for rows in cases.values():
        a, b = log_p[rows], log_q[rows]
        with torch.no_grad():
            fast = kl(a, b)
        masked = kl(a.clone().requires_grad_(True), b).detach()  # the autograd path: always masked
        torch.testing.assert_close(fast, masked, rtol=0, atol=0, equal_nan=True)
        for i, r in enumerate(rows):
            on = a[i].exp() > 0
            ref = (a[i].double().exp()[on] * (a[i].double()[on] - b[i].double()[on])).sum()
            if r == 4:
                assert fast[i].isnan()
            else:
                torch.testing.assert_close(fast[i].double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.isinf(kl(log_p[[2]], log_q[[2]])).all() and (log_p[3].exp() == 0).any()
