"""rkl — token-level reverse KD.

    L = τ² · mean_t KL(q_t^τ ‖ p_t^τ)

Mode-seeking: the student is penalised for mass where the teacher has little.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from kdtool.divergence import kl, log_softmax
from kdtool.objective import Metrics, Objective, ObjectiveOptions, token_metric
from kdtool.teacher import TeacherSignal

if TYPE_CHECKING:
    from torch import Tensor


class ReverseKLOptions(ObjectiveOptions):
    temperature: float = Field(1.0, gt=0, description="Softmax temperature τ for both models (loss × τ²).")


class ReverseKL(Objective[ReverseKLOptions]):
    name = "rkl"
    description = "Reverse KL(student ‖ teacher) per token (mode-seeking)."

    def token_losses(
        self, student_logits: Tensor, teacher: TeacherSignal, labels: Tensor, stats: dict[str, Any]
    ) -> tuple[Tensor, Metrics]:
        tau = self.options.temperature
        log_p = teacher.dense_log_probs(tau)  # [N, V]
        log_q = log_softmax(student_logits, tau)  # [N, V]
        divergence = kl(log_q, log_p) * tau**2  # [N]
        return divergence, {"rkl": token_metric(divergence)}
