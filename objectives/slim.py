"""slim — sparse logit KD with an adaptive per-token weight.

"For Distillation, Tokens Are Not All You Need" (Raman, Mani, Liang, Lipton; NeurIPS 2023
Instruction workshop). The teacher is kept only through its k = ⌈0.05·V⌉ largest logits:

    p̃_t   = softmax of the k stored teacher logits (zero elsewhere)
    L_t   = w_t · KL(p̃_t ‖ q_t) + (1 − w_t) · CE(q_t, g)
    KL(p̃ ‖ q) = Σ_{v ∈ top-k} p̃(v) (log p̃(v) − log q(v)),   q = the student's full-vocabulary softmax

Adaptive weight (``weight_rule``; kdtool's reading of the paper, whose exact formula was not
available): by default w_t = p̃_t(g) / (p̃_t(g) + q_t(g)), detached — large where the teacher
is more confident in the target than the student, 0 when g is not in the teacher's top-k.

``missing_mass = True`` (DistillKit's variant) uses the teacher's true probabilities on the
top-k, p(v) = exp(z_v − logsumexp z), plus one bucket for the rest of the vocabulary:

    KL = Σ_{v ∈ top-k} p(v) log(p(v)/q(v)) + p_rest log(p_rest / q_rest),  p_rest = 1 − Σ_{top-k} p.

Runs from a sparse cache or a dense/live teacher (whose top-k is taken on the fly with the
same k rule); log q is gathered at the k indices, so no dense teacher ``[N, V]`` is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from kdtool.divergence import kl, upcast
from kdtool.objective import Metrics, Objective, ObjectiveOptions, token_metric
from kdtool.sparse import DEFAULT_TOP_FRACTION, sparsify, student_log_probs_at, top_k_count
from kdtool.teacher import SparseSignal, TeacherSignal

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    from kdtool.lazy import torch

WeightRule = Literal["confidence_ratio", "teacher_prob", "constant"]


class SlimOptions(ObjectiveOptions):
    weight_rule: WeightRule = Field(
        "confidence_ratio",
        description=(
            "Per-token KD weight w: confidence_ratio = p̃(g)/(p̃(g)+q(g)) (default), "
            "teacher_prob = p̃(g), constant = kd_weight. Detached; p̃(g) = 0 when g is outside the top-k."
        ),
    )
    kd_weight: float = Field(0.5, ge=0, le=1, description="w for weight_rule=constant.")
    top_fraction: float = Field(
        DEFAULT_TOP_FRACTION,
        gt=0,
        le=1,
        description="Teacher logits kept per token, as a share of V: k = ceil(top_fraction·V).",
    )
    top_k: int | None = Field(
        None, gt=0, description="Keep exactly k teacher logits (overrides top_fraction)."
    )
    missing_mass: bool = Field(
        False,
        description="Add a rest-of-vocabulary bucket with the teacher's true top-k probabilities (DistillKit).",
    )


class Slim(Objective[SlimOptions]):
    name = "slim"
    description = "SLIM: KL to the teacher's top-5% logits + CE, mixed by an adaptive per-token weight."
    supports_sparse = True

    def token_losses(
        self, student_logits: Tensor, teacher: TeacherSignal, labels: Tensor, stats: dict[str, Any]
    ) -> tuple[Tensor, Metrics]:
        opt = self.options
        vocab = student_logits.shape[-1]
        top = sparsify(teacher, top_k_count(vocab, opt.top_fraction, opt.top_k))
        idx = top.indices  # [N, k]
        log_q_k, lse_q = student_log_probs_at(student_logits, idx)  # [N, k], [N]
        log_q_g = upcast(student_logits).gather(-1, labels.long().unsqueeze(-1)).squeeze(-1) - lse_q  # [N]
        ce = -log_q_g

        if opt.missing_mass:
            log_p_k = self._true_log_probs(top)  # [N, k]
            divergence = kl(*self._with_rest_bucket(log_p_k, log_q_k, student_logits, idx, lse_q))
        else:
            log_p_k = torch.log_softmax(upcast(top.values), dim=-1)  # log p̃ on the top-k  [N, k]
            divergence = kl(log_p_k, log_q_k)

        p_g = (log_p_k.exp() * (idx == labels.unsqueeze(-1))).sum(-1)  # p̃(g), 0 outside top-k  [N]
        w = self._weight(p_g.detach(), log_q_g.detach().exp(), opt)
        losses = w * divergence + (1 - w) * ce
        return losses, {"kl": token_metric(divergence), "ce": token_metric(ce), "kd_weight": token_metric(w)}

    @staticmethod
    def _weight(p_g: Tensor, q_g: Tensor, opt: SlimOptions) -> Tensor:
        """w_t per the rule, in [0, 1]; never differentiated."""
        if opt.weight_rule == "constant":
            return torch.full_like(p_g, opt.kd_weight)
        if opt.weight_rule == "teacher_prob":
            return p_g
        total = p_g + q_g
        return torch.where(total > 0, p_g / total.clamp(min=torch.finfo(total.dtype).tiny), 0.0)

    @staticmethod
    def _true_log_probs(top: SparseSignal) -> Tensor:
        """log p(v) = z_v − logsumexp(z) on the top-k: needs the teacher's log-partition."""
        if top.log_normalizer is None:
            raise ValueError(
                "slim missing_mass=true needs the teacher's log-partition; this sparse signal has none"
            )
        values = upcast(top.values)
        return values - top.log_normalizer.to(values.dtype).unsqueeze(-1)

    @staticmethod
    def _with_rest_bucket(
        log_p_k: Tensor, log_q_k: Tensor, student_logits: Tensor, idx: Tensor, lse_q: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Append the rest-of-vocabulary bucket to both: ``[N, k] -> [N, k + 1]``."""
        # Teacher: p_rest = 1 − Σ_k p (no gradient needed, so the subtraction is fine).
        p_rest = (-torch.expm1(torch.logsumexp(log_p_k, -1).clamp(max=0))).clamp(min=0)  # [N]
        # Student: q_rest summed directly over the complement, exact even when it is tiny.
        outside = upcast(student_logits).scatter(-1, idx, float("-inf"))  # [N, V]
        empty = torch.isneginf(outside).all(-1, keepdim=True)
        # logsumexp over an all −inf row has a NaN gradient: route such rows around it.
        lse_rest = torch.logsumexp(outside.masked_fill(empty, 0.0), -1)
        log_q_rest = torch.where(empty.squeeze(-1), float("-inf"), lse_rest - lse_q)
        # A support covering the whole vocabulary leaves no rest: any p_rest there is rounding.
        p_rest = p_rest.masked_fill(empty.squeeze(-1), 0.0)
        log_p = torch.cat([log_p_k, torch.log(p_rest).unsqueeze(-1)], -1)
        log_q = torch.cat([log_q_k, log_q_rest.unsqueeze(-1)], -1)
        return log_p, log_q
