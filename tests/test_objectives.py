"""Every registered objective against a slow, obviously-correct reference written here.

``REFERENCES`` maps each objective name (``kdtool.registry.available()``) to a reference computed
token by token in float64 from the formulas of shared/REFERENCES.md — explicit softmaxes and sums,
none of kdtool's divergence helpers — and the option sets to run it with. The tests compare value,
metrics and gradient (autograd on the reference vs autograd on kdtool) through the public
``objective.loss(student [B, T, V], teacher, labels [B, T])``, with masked prompts, padding,
an all-masked batch, a sparse (top-k) teacher for sparse-capable objectives, and ±1e4 logits.

A newly registered objective fails ``test_every_registered_objective_has_a_reference`` until it
gets an entry in ``REFERENCES`` (or, if its loss is not token-level, in ``COVERED_ELSEWHERE``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch

import kdtool
from kdtool import registry
from kdtool.objective import IGNORE_INDEX, Objective
from kdtool.teacher import TeacherSignal

INF = math.inf
TESTS = Path(__file__).resolve().parent
Tensor = torch.Tensor

# ================================================================ reference building blocks
# One token at a time, float64, straight from the formulas. Rows are 1-D tensors of the student's
# logits (sliced from a leaf that requires grad, so autograd gives the reference gradient).


def logsumexp(x: Tensor) -> Tensor:
    """log Σ_v exp(x_v) = m + log Σ_v exp(x_v − m), m = the largest finite entry; −inf if none."""
    finite = x[torch.isfinite(x)]
    if finite.numel() == 0:
        return x.new_tensor(-INF)
    m = finite.max().detach()
    return m + torch.log(torch.exp(x - m).sum())


def log_softmax(z: Tensor, tau: float = 1.0) -> Tensor:
    """log softmax(z / τ) of one row; −inf logits keep probability 0."""
    return z / tau - logsumexp(z / tau)


def kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a ‖ b) = Σ_{v: a(v) > 0} a(v) (log a(v) − log b(v)), with 0 · log 0 = 0."""
    a = log_a.exp()
    on = a > 0
    return (a[on] * (log_a[on] - log_b[on])).sum()


def kl_to_mix(log_a: Tensor, log_x: Tensor, log_y: Tensor, w: float) -> Tensor:
    """KL(a ‖ m), m = w·x + (1 − w)·y summed in probability space on a's support (where m > 0)."""
    a = log_a.exp()
    on = a > 0
    m = w * log_x[on].exp() + (1 - w) * log_y[on].exp()
    return (a[on] * (log_a[on] - torch.log(m))).sum()


class Sparse(NamedTuple):
    """A sparse teacher for the reference: top-k logits per token, as a cache stores them."""

    values: Tensor  # [B, T, k]
    indices: Tensor  # [B, T, k]
    vocab_size: int
    log_normalizer: Tensor | None  # [B, T] teacher logsumexp over the full vocabulary


class TeacherRow(NamedTuple):
    """The teacher at one position: dense ``logits [V]``, or the stored top-k ``(values, indices)``."""

    logits: Tensor | None
    values: Tensor | None = None
    indices: Tensor | None = None
    vocab_size: int | None = None
    log_normalizer: float | None = None


def teacher_row(teacher: Tensor | Sparse | None, b: int, t: int) -> TeacherRow | None:
    if teacher is None:
        return None
    if isinstance(teacher, Sparse):
        lse = None if teacher.log_normalizer is None else float(teacher.log_normalizer[b, t])
        return TeacherRow(None, teacher.values[b, t], teacher.indices[b, t], teacher.vocab_size, lse)
    return TeacherRow(teacher[b, t])


def teacher_log_probs(row: TeacherRow, tau: float = 1.0) -> Tensor:
    """log p over the whole vocabulary; a sparse teacher is the softmax of its k stored logits
    (log p = −inf elsewhere)."""
    if row.logits is not None:
        return log_softmax(row.logits.double(), tau)
    assert row.values is not None and row.indices is not None and row.vocab_size is not None
    out = torch.full((row.vocab_size,), -INF, dtype=torch.float64)
    on_support = log_softmax(row.values.double(), tau)
    for j, v in enumerate(row.indices.tolist()):
        out[v] = on_support[j]
    return out


def teacher_top_k(row: TeacherRow, k: int) -> tuple[list[int], Tensor, float | None]:
    """The teacher's k largest logits: (ids, logits [k], log-partition of the full row or None).
    A sparse row keeps the k largest of what it stores."""
    if row.logits is not None:
        logits = row.logits.double()
        ids = sorted(range(logits.numel()), key=lambda v: -float(logits[v]))[:k]
        return ids, logits[ids], float(logsumexp(logits))
    assert row.values is not None and row.indices is not None
    order = sorted(range(row.values.numel()), key=lambda j: -float(row.values[j]))[:k]
    ids = [int(row.indices[j]) for j in order]
    return ids, row.values.double()[order], row.log_normalizer


# ================================================================ references, one per objective
# Token references return {"loss": ..., <metric>: ...}; the objective's loss is their mean over
# the non-ignored tokens, and each metric is that metric's mean.


def ref_fkl(s: Tensor, t: TeacherRow, g: int, o: dict) -> dict[str, Tensor]:
    """(1 − w)·τ²·KL(p^τ ‖ q^τ) + w·CE(q, g), CE at τ = 1."""
    tau, w = o.get("temperature", 1.0), o.get("ce_weight", 0.0)
    divergence = kl(teacher_log_probs(t, tau), log_softmax(s, tau)) * tau**2
    out = {"loss": divergence, "kl": divergence}
    if w > 0:
        ce = -log_softmax(s)[g]
        out |= {"loss": (1 - w) * divergence + w * ce, "ce": ce}
    return out


def ref_rkl(s: Tensor, t: TeacherRow, g: int, o: dict) -> dict[str, Tensor]:
    """τ²·KL(q^τ ‖ p^τ)."""
    tau = o.get("temperature", 1.0)
    divergence = kl(log_softmax(s, tau), teacher_log_probs(t, tau)) * tau**2
    return {"loss": divergence, "rkl": divergence}


def ref_sft(s: Tensor, t: TeacherRow | None, g: int, o: dict) -> dict[str, Tensor]:
    """−log q(g)."""
    ce = -log_softmax(s)[g]
    return {"loss": ce, "ce": ce}


def ref_jsd(s: Tensor, t: TeacherRow, g: int, o: dict) -> dict[str, Tensor]:
    """M = βp + (1 − β)q (in probability space), JSD_β = β KL(p ‖ M) + (1 − β) KL(q ‖ M), × τ²."""
    beta, tau = o.get("beta", 0.5), o.get("temperature", 1.0)
    log_p, log_q = teacher_log_probs(t, tau), log_softmax(s, tau)
    divergence = beta * kl_to_mix(log_p, log_p, log_q, beta) + (1 - beta) * kl_to_mix(
        log_q, log_p, log_q, beta
    )
    divergence = divergence * tau**2
    return {"loss": divergence, "jsd": divergence}


def ref_tvd(s: Tensor, t: TeacherRow, g: int, o: dict) -> dict[str, Tensor]:
    """½ Σ_v |p^τ(v) − q^τ(v)| (no τ² factor)."""
    tau = o.get("temperature", 1.0)
    distance = 0.5 * (teacher_log_probs(t, tau).exp() - log_softmax(s, tau).exp()).abs().sum()
    return {"loss": distance, "tvd": distance}


def ref_skl(s: Tensor, t: TeacherRow, g: int, o: dict) -> dict[str, Tensor]:
    """SKL_α = KL(p ‖ αp + (1 − α)q)."""
    a = o.get("alpha", 0.1)
    log_p, log_q = teacher_log_probs(t), log_softmax(s)
    divergence = kl_to_mix(log_p, log_p, log_q, a)
    return {"loss": divergence, "skl": divergence}


def ref_srkl(s: Tensor, t: TeacherRow, g: int, o: dict) -> dict[str, Tensor]:
    """SRKL_α = KL(q ‖ (1 − α)p + αq)."""
    a = o.get("alpha", 0.1)
    log_p, log_q = teacher_log_probs(t), log_softmax(s)
    divergence = kl_to_mix(log_q, log_p, log_q, 1 - a)
    return {"loss": divergence, "srkl": divergence}


def slim_k(vocab: int, o: dict) -> int:
    """k = top_k, else ⌈top_fraction · V⌉ in exact decimal arithmetic; within [1, V]."""
    k = o.get("top_k") or math.ceil(Fraction(str(o.get("top_fraction", 0.05))) * vocab)
    return max(1, min(k, vocab))


def ref_slim(s: Tensor, t: TeacherRow, g: int, o: dict) -> dict[str, Tensor]:
    """L = w·KL(p̃ ‖ q) + (1 − w)·CE(q, g) on the teacher's top-k; w detached.

    p̃ = softmax of the k kept logits; with ``missing_mass`` the teacher's true probabilities
    on the top-k plus one rest-of-vocabulary bucket on each side.
    """
    ids, top_logits, lse = teacher_top_k(t, slim_k(s.numel(), o))
    log_q = log_softmax(s)
    if o.get("missing_mass"):
        assert lse is not None
        log_p = top_logits - lse  # true teacher log-probabilities on the top-k
        rest = [v for v in range(s.numel()) if v not in ids]
        p_rest = max(0.0, 1.0 - float(log_p.exp().sum())) if rest else 0.0
        log_q_rest = logsumexp(log_q[rest]) if rest else log_q.new_tensor(-INF)
        divergence = kl(
            torch.cat([log_p, log_p.new_tensor([math.log(p_rest) if p_rest > 0 else -INF])]),
            torch.cat([log_q[ids], log_q_rest.reshape(1)]),
        )
    else:
        log_p = log_softmax(top_logits)
        divergence = kl(log_p, log_q[ids])
    ce = -log_q[g]
    p_g = math.exp(float(log_p[ids.index(g)])) if g in ids else 0.0
    q_g = math.exp(float(log_q[g].detach()))  # the weight is detached
    rule = o.get("weight_rule", "confidence_ratio")
    if rule == "constant":
        w = o.get("kd_weight", 0.5)
    elif rule == "teacher_prob":
        w = p_g
    else:
        w = p_g / (p_g + q_g) if p_g + q_g > 0 else 0.0
    return {"loss": w * divergence + (1 - w) * ce, "kl": divergence, "ce": ce, "kd_weight": s.new_tensor(w)}


class Split(NamedTuple):
    """One distribution at one position split at the target g (log-probabilities)."""

    binary: Tensor  # [2]: log p_g, log(1 − p_g)
    hat: Tensor | None  # [V − 1]: log p̂ over v ≠ g; None when no mass is off g


def split(scores: Tensor, g: int) -> Split:
    """b = [p_g, 1 − p_g] and p̂ = p on v ≠ g renormalised, from scores (logits/τ or log-probs).
    1 − p_g is summed over v ≠ g, not subtracted from 1, so it survives p_g → 1."""
    others = torch.cat([scores[:g], scores[g + 1 :]])
    log_z, log_rest = logsumexp(scores), logsumexp(others)
    binary = torch.stack([scores[g] - log_z, log_rest - log_z])
    return Split(binary, None if log_rest == -INF else others - log_rest)


def ref_atkd(tokens: list[tuple[Tensor, TeacherRow, int]], o: dict) -> tuple[Tensor, dict[str, float]]:
    """L = λ · mean_easy(DKD) + (1 − λ) · mean_hard(TKD + DKD), × τ².

    TKD = KL(b^p ‖ b^q), DKD = KL(p̂ ‖ q̂) (base fkl; swapped for rkl). Hard: UnC = 1 − p_g at or
    above the lower quantile at 1 − hard_fraction of the valid tokens' UnC (the median by default).
    """
    lam, frac, tau = o.get("lambda", 0.2), o.get("hard_fraction", 0.5), o.get("temperature", 1.0)
    rows = []
    for s, t, g in tokens:
        p, q = split(teacher_log_probs(t, tau), g), split(s / tau, g)
        first, second = (p, q) if o.get("base", "fkl") == "fkl" else (q, p)
        tkd = kl(first.binary, second.binary) * tau**2
        dkd = kl(first.hat, second.hat) * tau**2 if first.hat is not None else s.new_tensor(0.0)
        rows.append((tkd, dkd, math.exp(float(p.binary[1]))))
    uncs = sorted(u for _, _, u in rows)
    k = math.floor((1 - frac) * (len(rows) - 1) + 1e-9)
    threshold = uncs[k]
    # Test data must not put the split on a near-tie: two exact computations may order it differently.
    assert k == 0 or uncs[k] - uncs[k - 1] > 1e-6 * max(uncs[k], 1e-300), "near-tie at the ATKD split"
    hard = [(a, d) for a, d, u in rows if u >= threshold]
    easy = [(a, d) for a, d, u in rows if u < threshold]

    def mean(xs):
        return sum(xs) / len(xs) if xs else torch.tensor(0.0, dtype=torch.float64)

    loss = lam * mean([d for _, d in easy]) + (1 - lam) * mean([a + d for a, d in hard])
    metrics = {
        "hard_fraction": len(hard) / len(rows),
        "uncertainty": sum(u for _, _, u in rows) / len(rows),
        "tkd_hard": float(mean([a for a, _ in hard]).detach()),
        "dkd_hard": float(mean([d for _, d in hard]).detach()),
        "tkd_easy": float(mean([a for a, _ in easy]).detach()),
        "dkd_easy": float(mean([d for _, d in easy]).detach()),
    }
    return loss, metrics


# ================================================================ the table

TokenRef = Callable[[Tensor, Any, int, dict], dict[str, Tensor]]
BatchRef = Callable[[list[tuple[Tensor, Any, int]], dict], tuple[Tensor, dict[str, float]]]


@dataclass(frozen=True)
class Reference:
    """How to check one objective: a per-token or a whole-batch reference, and the option sets."""

    cases: tuple[dict, ...]  # the first is {} (the defaults)
    token: TokenRef | None = None  # loss = mean over valid tokens of token(...)["loss"]
    batch: BatchRef | None = None  # for objectives whose token weights depend on the batch
    sparse_cases: tuple[dict, ...] = ()  # also run from a sparse teacher (sparse-capable objectives)
    zero_at_identity: tuple[dict, ...] = ()  # option sets for which teacher = student gives 0


REFERENCES: dict[str, Reference] = {
    "fkl": Reference(
        token=ref_fkl,
        cases=(
            {},
            {"ce_weight": 0.5},
            {"ce_weight": 1.0},
            {"temperature": 2.0},
            {"temperature": 0.5, "ce_weight": 0.3},
        ),
        sparse_cases=({}, {"ce_weight": 0.5}, {"temperature": 2.0}),
        zero_at_identity=({}, {"temperature": 2.0}),
    ),
    "rkl": Reference(
        token=ref_rkl, cases=({}, {"temperature": 0.5}, {"temperature": 2.0}), zero_at_identity=({},)
    ),
    "sft": Reference(token=ref_sft, cases=({},)),
    "jsd": Reference(
        token=ref_jsd,
        cases=({}, {"beta": 0.1}, {"beta": 0.9, "temperature": 2.0}),
        zero_at_identity=({}, {"beta": 0.1}),
    ),
    "tvd": Reference(token=ref_tvd, cases=({}, {"temperature": 2.0}), zero_at_identity=({},)),
    "skl": Reference(token=ref_skl, cases=({}, {"alpha": 0.5}), zero_at_identity=({},)),
    "srkl": Reference(token=ref_srkl, cases=({}, {"alpha": 0.3}), zero_at_identity=({},)),
    "slim": Reference(
        token=ref_slim,
        cases=(
            {},
            {"top_k": 3},
            {"top_fraction": 0.3},  # 0.3 · 10 is 3.0000000000000004 in binary floating point: k = 3
            {"top_fraction": 0.25},  # ⌈2.5⌉ = 3
            {"weight_rule": "constant", "kd_weight": 0.3, "top_k": 4},
            {"weight_rule": "teacher_prob", "top_k": 4},
            {"missing_mass": True},
            {"missing_mass": True, "top_k": 4},
            {"missing_mass": True, "weight_rule": "teacher_prob", "top_k": 10},  # k = V: empty rest
        ),
        sparse_cases=(
            {},
            {"top_k": 3},
            {"top_k": 8},  # more than stored: all stored entries
            {"weight_rule": "teacher_prob", "top_fraction": 0.3},
            {"missing_mass": True, "top_k": 4},
            {"missing_mass": True, "weight_rule": "constant", "kd_weight": 0.7},
        ),
    ),
    "atkd": Reference(
        batch=ref_atkd,
        cases=(
            {},
            {"lambda": 0.5, "hard_fraction": 0.3},
            {"temperature": 2.0, "hard_fraction": 0.8},
            {"base": "rkl"},
            {"base": "rkl", "lambda": 0.7, "temperature": 0.5},
        ),
        sparse_cases=({}, {"lambda": 0.5, "hard_fraction": 0.3}),  # base=rkl refuses a sparse teacher
        zero_at_identity=({}, {"base": "rkl"}),
    ),
}

# Objectives whose loss is not a function of per-token logits, and the test file that covers them.
COVERED_ELSEWHERE: dict[str, str] = {
    "minillm": "test_minillm_enumeration.py",  # on-policy: sampled gradient vs enumerated exact KL
    "opd": "test_opd.py",  # on-policy: mean sampled gradient vs the enumerated per-position reverse KL
}


def missing_references(
    objectives: Mapping[str, type[Objective]], covered_elsewhere: Mapping[str, str] = COVERED_ELSEWHERE
) -> list[str]:
    """One message per registered objective that no reference test covers."""
    problems = []
    for name, cls in objectives.items():
        if name in REFERENCES:
            continue
        if name not in covered_elsewhere:
            problems.append(
                f"objective {name!r} is registered but has no reference test: add a reference for it "
                "to REFERENCES in tests/test_objectives.py (or, if its loss is not token-level, "
                "name the test file that covers it in COVERED_ELSEWHERE)"
            )
            continue
        path = TESTS / covered_elsewhere[name]
        if getattr(cls, "scores_references", True):
            problems.append(f"objective {name!r} is token-level: add a reference for it to REFERENCES")
        elif not path.is_file():
            problems.append(f"objective {name!r}: {path} (its test file in COVERED_ELSEWHERE) does not exist")
        elif not re.search(rf"\b{re.escape(name)}\b", path.read_text()):
            problems.append(f"objective {name!r}: {path} does not mention it; add a reference for it")
    return problems


# ================================================================ running a reference


def reference_loss(
    name: str, student: Tensor, teacher: Tensor | Sparse | None, labels: Tensor, opts: dict
) -> tuple[Tensor, dict[str, float]]:
    """The reference loss (a float64 tensor, differentiable in ``student``) and metrics."""
    spec = REFERENCES[name]
    tokens = [
        (student[b, t].double(), teacher_row(teacher, b, t), int(labels[b, t]))
        for b in range(labels.shape[0])
        for t in range(labels.shape[1])
        if int(labels[b, t]) != IGNORE_INDEX
    ]
    if not tokens:
        return torch.zeros((), dtype=torch.float64), {}
    if spec.batch is not None:
        return spec.batch(tokens, opts)
    assert spec.token is not None
    outs = [spec.token(s, t, g, opts) for s, t, g in tokens]
    means = {key: sum(out[key] for out in outs) / len(outs) for key in outs[0]}
    return means.pop("loss"), {key: float(v.detach()) for key, v in means.items()}


def reference_value_and_grad(name, student, teacher, labels, opts) -> tuple[float, Tensor, dict]:
    leaf = student.detach().double().clone().requires_grad_(True)
    loss, metrics = reference_loss(name, leaf, teacher, labels, opts)
    (grad,) = torch.autograd.grad(loss, leaf, allow_unused=True) if loss.requires_grad else (None,)
    return float(loss.detach()), torch.zeros_like(leaf) if grad is None else grad, metrics


def kdtool_value_and_grad(name, student, teacher, labels, opts) -> tuple[Tensor, Tensor, dict]:
    obj = kdtool.get_objective(name, **opts)
    leaf = student.detach().clone().requires_grad_(True)
    signal = teacher
    if isinstance(teacher, Sparse):
        signal = TeacherSignal.sparse(*teacher)
    loss, metrics = obj.loss(leaf, signal if obj.needs_teacher else None, labels)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad, metrics


def check_against_reference(name, student, teacher, labels, opts, rel=1e-10, grad_tol=1e-10):
    loss, grad, metrics = kdtool_value_and_grad(name, student, teacher, labels, opts)
    ref_teacher = teacher.double() if isinstance(teacher, Tensor) else teacher
    expected, expected_grad, expected_metrics = reference_value_and_grad(
        name, student, ref_teacher, labels, opts
    )
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert float(loss) == pytest.approx(expected, rel=rel, abs=rel)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=grad_tol, atol=grad_tol)
    assert set(expected_metrics) <= set(metrics), f"metrics {sorted(metrics)}"
    tol = max(rel, 1e-6)  # metrics are reported in fp32
    assert {k: metrics[k] for k in expected_metrics} == pytest.approx(expected_metrics, rel=tol, abs=tol)
    assert (grad[labels == IGNORE_INDEX] == 0).all()  # ignored positions get no gradient


# ================================================================ data

V = 10


def make_batch(seed: int = 0, B: int = 3, T: int = 4, scale: float = 3.0, garbage: bool = True):
    """float64 logits [B, T, V] and labels with a masked prompt, trailing padding and a padding row;
    ignored positions hold large garbage logits that must not matter."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale
    t = torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 1] = int(t[0, 1].argmax())  # a target the teacher ranks first (slim's p̃(g) > 0)
    labels[0, 0] = IGNORE_INDEX  # a masked prompt token
    labels[1, -1] = IGNORE_INDEX  # trailing padding
    if B > 2:
        labels[2] = IGNORE_INDEX  # a padding row: no target at all
    ignored = labels == IGNORE_INDEX
    if not garbage:
        return s, t, labels
    s[ignored] = 300.0 * torch.randn(int(ignored.sum()), V, generator=g, dtype=torch.float64)
    t[ignored] = -300.0 * torch.randn(int(ignored.sum()), V, generator=g, dtype=torch.float64)
    return s, t, labels


# Teacher target logit = the row's largest other logit + margin, for the six valid tokens: 1 − p_g
# is 0 (underflows; p̂ still defined), ≈ 0.05, 0.27, 0.5, 0.88 and 1 (p_g underflows), so ATKD's
# hard/easy split is well separated at every hard_fraction used (in fp32 too).
TARGET_MARGINS = {(0, 1): 3.0, (0, 2): 1e5, (0, 3): 1.0, (1, 0): 0.0, (1, 1): -2.0, (1, 2): -1e5}


def extreme_batch(seed: int = 0):
    """±1e4-scale logits (near one-hot probabilities, log-probabilities of order −1e4), −inf at the
    same vocabulary entries in both models, chosen teacher margins on the target, a flat student
    row and a token where student = teacher."""
    s, t, labels = make_batch(seed, scale=1.0)
    s, t = s * 1e4, t * 1e4
    s[..., -2:] = -INF  # e.g. padded embedding rows
    t[..., -2:] = -INF
    labels = labels.clamp(max=V - 3).masked_fill(labels == IGNORE_INDEX, IGNORE_INDEX)
    for (b, i), margin in TARGET_MARGINS.items():
        g = int(labels[b, i])
        others = torch.cat([t[b, i, :g], t[b, i, g + 1 : V - 2]])
        t[b, i, g] = others.max() + margin
    s[0, 3, : V - 2] = 0.0
    s[1, 1] = t[1, 1]
    return s, t, labels


def sparse_teacher(t: Tensor, k: int) -> Sparse:
    """The teacher's k largest logits per position, with its full-vocabulary log-partition."""
    values, indices = t.topk(k, dim=-1)
    return Sparse(values, indices, t.shape[-1], torch.logsumexp(t, dim=-1))


# ================================================================ completeness


def _cases(field: str) -> list[Any]:
    available = registry.available()
    return [
        pytest.param(name, opts, id=f"{name}-{opts}")
        for name, spec in REFERENCES.items()
        if name in available
        for opts in getattr(spec, field)
    ]


@pytest.mark.parametrize("name", list(registry.available()))
def test_every_registered_objective_has_a_reference(name):
    problems = missing_references({name: registry.get_class(name)})
    assert not problems, "\n".join(problems)


def test_completeness_check_reports_an_objective_without_a_reference(monkeypatch):
    """A plug-in registered through the entry-point group, with no reference, is reported."""
    real = list(registry.entry_points(group=registry.GROUP))
    fake = EntryPoint("fake_kd", "kdtool.objectives.forward_kl:ForwardKL", registry.GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda **_: [*real, fake])
    registry.reload()
    try:
        found = registry.available()
        assert "fake_kd" in found
        problems = missing_references(found)
    finally:
        monkeypatch.undo()
        registry.reload()
    assert len(problems) == 1
    assert "'fake_kd'" in problems[0] and "add a reference" in problems[0]
    assert "fake_kd" not in registry.available()


def test_completeness_check_verifies_the_covered_elsewhere_map():
    minillm = registry.get_class("minillm")
    fkl = registry.get_class("fkl")
    assert not missing_references({"minillm": minillm})
    (gone,) = missing_references({"minillm": minillm}, {"minillm": "test_no_such_file.py"})
    assert "does not exist" in gone
    (silent,) = missing_references({"minillm": minillm}, {"minillm": "test_data.py"})
    assert "does not mention" in silent
    (token_level,) = missing_references({"fake_kd": fkl}, {"fake_kd": "test_objectives.py"})
    assert "add a reference" in token_level


def test_reference_table_matches_the_registry():
    available = registry.available()
    assert not set(REFERENCES) - set(available), "REFERENCES names objectives that are not registered"
    assert not set(REFERENCES) & set(COVERED_ELSEWHERE)
    for name, spec in REFERENCES.items():
        cls = available[name]
        assert (spec.token is None) != (spec.batch is None), name
        assert spec.cases[0] == {}, f"{name}: the first case is the defaults"
        for opts in (*spec.cases, *spec.sparse_cases, *spec.zero_at_identity):
            cls.Options(**opts)  # every option set is valid
        # a sparse-capable objective is checked from a sparse teacher, and only those are
        assert bool(spec.sparse_cases) == cls.supports_sparse, name
        assert cls.scores_references, name


# ================================================================ against the reference


@pytest.mark.parametrize(("name", "opts"), _cases("cases"))
def test_value_gradient_and_metrics_match_reference(name, opts):
    s, t, labels = make_batch()
    check_against_reference(name, s, t, labels, opts)


@pytest.mark.parametrize(("name", "opts"), _cases("sparse_cases"))
def test_sparse_teacher_matches_reference(name, opts):
    """A cache-like signal: top-5 of 10 logits per position plus the teacher's log-partition."""
    s, t, labels = make_batch(seed=1)
    order = t.argsort(dim=-1, descending=True)
    # The target's rank in the teacher (0 = argmax; 5 and up are not stored), position by position.
    for (b, i), rank in {(0, 1): 0, (0, 2): 1, (0, 3): 4, (1, 0): 2, (1, 1): 9, (1, 2): 6}.items():
        labels[b, i] = order[b, i, rank]
    check_against_reference(name, s, sparse_teacher(t, 5), labels, opts)


@pytest.mark.parametrize(("name", "opts"), _cases("cases"))
def test_extreme_logits_match_reference(name, opts):
    s, t, labels = extreme_batch()
    check_against_reference(name, s, t, labels, opts, rel=1e-9, grad_tol=1e-9)
    # fp32: the logits' own rounding (ulp(1e4) ≈ 1e-3) bounds the agreement
    check_against_reference(name, s.float(), t.float(), labels, opts, rel=1e-3, grad_tol=1e-3)


@pytest.mark.parametrize(("name", "opts"), _cases("cases"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_masked_batch_is_zero_with_finite_zero_gradient(name, opts, dtype):
    s, t, labels = make_batch()
    labels[:] = IGNORE_INDEX
    loss, grad, metrics = kdtool_value_and_grad(name, s.to(dtype), t.to(dtype), labels, opts)
    assert float(loss) == 0.0
    assert torch.isfinite(grad).all() and float(grad.abs().sum()) == 0.0
    assert all(math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize(("name", "opts"), _cases("sparse_cases"))
def test_all_masked_batch_from_a_sparse_teacher_is_zero(name, opts):
    s, t, labels = make_batch()
    labels[:] = IGNORE_INDEX
    loss, grad, _ = kdtool_value_and_grad(name, s.float(), sparse_teacher(t.float(), 5), labels, opts)
    assert float(loss) == 0.0
    assert torch.isfinite(grad).all() and float(grad.abs().sum()) == 0.0


@pytest.mark.parametrize(("name", "opts"), _cases("cases"))
def test_masked_positions_do_not_matter(name, opts):
    s, t, labels = make_batch()
    loss, grad, _ = kdtool_value_and_grad(name, s, t, labels, opts)
    ignored = labels == IGNORE_INDEX
    s2, t2 = s.clone(), t.clone()
    s2[ignored] = -s2[ignored] + 5.0  # e.g. would move ATKD's quantile or slim's top-k
    t2[ignored] = 1e3 * torch.randn_like(t2[ignored])
    again, grad2, _ = kdtool_value_and_grad(name, s2, t2, labels, opts)
    assert float(again) == pytest.approx(float(loss), rel=1e-12)
    torch.testing.assert_close(grad2, grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(("name", "opts"), _cases("cases"))
def test_flat_rows_give_the_batched_loss(name, opts):
    """``loss`` also takes ``[N, V]`` logits with ``[N]`` labels (the documented alternative shape)."""
    s, t, labels = make_batch()
    loss, grad, _ = kdtool_value_and_grad(name, s, t, labels, opts)
    flat, flat_grad, _ = kdtool_value_and_grad(
        name, s.reshape(-1, V), t.reshape(-1, V), labels.reshape(-1), opts
    )
    assert float(flat) == pytest.approx(float(loss), rel=1e-12)
    torch.testing.assert_close(flat_grad, grad.reshape(-1, V), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(("name", "opts"), _cases("zero_at_identity"))
def test_identical_distributions_give_zero(name, opts):
    s, _, labels = make_batch()
    loss, grad, _ = kdtool_value_and_grad(name, s, s.clone(), labels, opts)
    assert abs(float(loss)) < 1e-12
    assert float(grad.abs().max()) < 1e-12  # and it is a minimum


@pytest.mark.parametrize("name", list(REFERENCES))
def test_reference_gradient_is_the_reference_derivative(name):
    """The references' autograd gradient equals their central differences (guards the references:
    a stray detach or an in-place edit there would otherwise make kdtool and reference agree on
    nothing). Slim's default weight depends on the student (detached), so its constant rule."""
    opts = {"weight_rule": "constant", "kd_weight": 0.4, "missing_mass": True} if name == "slim" else {}
    s, t, labels = make_batch(B=2, T=2)
    s, t = s[:, :, :6].contiguous(), t[:, :, :6].contiguous()
    labels = labels.clamp(max=5).masked_fill(labels == IGNORE_INDEX, IGNORE_INDEX)
    _, grad, _ = reference_value_and_grad(name, s, t, labels, opts)
    numeric, eps = torch.zeros_like(s), 1e-6
    flat = s.reshape(-1)
    with torch.no_grad():
        for i in range(flat.numel()):
            old = float(flat[i])
            flat[i] = old + eps
            up = float(reference_loss(name, s, t, labels, opts)[0])
            flat[i] = old - eps
            down = float(reference_loss(name, s, t, labels, opts)[0])
            flat[i] = old
            numeric.reshape(-1)[i] = (up - down) / (2 * eps)
    torch.testing.assert_close(grad, numeric, rtol=1e-5, atol=1e-8)


# ================================================================ identities and edges


def test_fkl_equals_cross_entropy_to_teacher_minus_entropy():
    """A known identity: KL(p‖q) = H(p, q) − H(p)."""
    s, t, labels = make_batch(garbage=False)
    labels[:] = 0
    p, log_q = torch.softmax(t, -1), torch.log_softmax(s, -1)
    expected = (-(p * log_q).sum(-1) + (p * torch.log(p)).sum(-1)).mean()
    loss, _ = kdtool.get_objective("fkl").loss(s, t, labels)
    assert float(loss) == pytest.approx(float(expected), rel=1e-10)


def test_sft_needs_no_teacher_and_matches_torch_cross_entropy():
    s, _, labels = make_batch()
    loss, _ = kdtool.get_objective("sft").loss(s, None, labels)
    expected = torch.nn.functional.cross_entropy(s.reshape(-1, V), labels.reshape(-1))
    assert float(loss) == pytest.approx(float(expected), rel=1e-10)


def test_bf16_and_fp32_inputs_agree():
    s, t, labels = make_batch()
    for name in ("fkl", "rkl", "jsd", "tvd"):
        obj = kdtool.get_objective(name)
        full, _ = obj.loss(s.float(), t.float(), labels)
        half, _ = obj.loss(s.bfloat16(), t.bfloat16(), labels)
        assert float(half) == pytest.approx(float(full), rel=5e-2, abs=5e-3)


def test_unknown_objective_and_bad_options_are_user_errors():
    from kdtool.errors import UserError

    with pytest.raises(UserError, match=r"known objectives: .*fkl"):
        kdtool.get_objective("nope")
    with pytest.raises(UserError, match="ce_weight"):
        kdtool.get_objective("fkl", ce_weight=2.0)
    with pytest.raises(UserError, match="unknown_option"):
        kdtool.get_objective("fkl", unknown_option=1)
