"""skl / srkl — DistiLLM's skew KL divergences (Ko et al., 2024).

SKL_α  = KL(p ‖ α·p + (1 − α)·q)
SRKL_α = KL(q ‖ (1 − α)·p + α·q)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from kdtool.divergence import kl, log_mix, log_softmax
from kdtool.objective import Metrics, Objective, ObjectiveOptions, token_metric
from kdtool.teacher import TeacherSignal

if TYPE_CHECKING:
    from torch import Tensor


class SkewOptions(ObjectiveOptions):
    alpha: float = Field(
        0.1, gt=0, lt=1, description="Skew α: the share of the first distribution in the mix."
    )


class SkewKL(Objective[SkewOptions]):
    name = "skl"
    description = "Skew forward KL(p ‖ αp + (1−α)q) (DistiLLM)."

    def token_losses(
        self, student_logits: Tensor, teacher: TeacherSignal, labels: Tensor, stats: dict[str, Any]
    ) -> tuple[Tensor, Metrics]:
        alpha = self.options.alpha
        log_p = teacher.dense_log_probs()
        log_q = log_softmax(student_logits)
        divergence = kl(log_p, log_mix(log_p, log_q, alpha))
        return divergence, {"skl": token_metric(divergence)}


class SkewReverseKL(Objective[SkewOptions]):
    name = "srkl"
    description = "Skew reverse KL(q ‖ (1−α)p + αq) (DistiLLM)."

    def token_losses(
        self, student_logits: Tensor, teacher: TeacherSignal, labels: Tensor, stats: dict[str, Any]
    ) -> tuple[Tensor, Metrics]:
        alpha = self.options.alpha
        log_p = teacher.dense_log_probs()
        log_q = log_softmax(student_logits)
        divergence = kl(log_q, log_mix(log_q, log_p, alpha))
        return divergence, {"srkl": token_metric(divergence)}
