"""jsd — β-generalised Jensen–Shannon divergence (as in GKD).

M = β·p + (1 − β)·q,    JSD_β = β·KL(p ‖ M) + (1 − β)·KL(q ‖ M)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from kdtool.divergence import kl, log_mix, log_softmax
from kdtool.objective import Metrics, Objective, ObjectiveOptions, token_metric
from kdtool.teacher import TeacherSignal

if TYPE_CHECKING:
    from torch import Tensor


class JSDOptions(ObjectiveOptions):
    beta: float = Field(0.5, gt=0, lt=1, description="Mixture weight β of the teacher in M.")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature τ (loss × τ²).")


class JSD(Objective[JSDOptions]):
    name = "jsd"
    description = "β-generalised Jensen–Shannon divergence between teacher and student (GKD)."

    def token_losses(
        self, student_logits: Tensor, teacher: TeacherSignal, labels: Tensor, stats: dict[str, Any]
    ) -> tuple[Tensor, Metrics]:
        opt = self.options
        log_p = teacher.dense_log_probs(opt.temperature)
        log_q = log_softmax(student_logits, opt.temperature)
        log_m = log_mix(log_p, log_q, opt.beta)
        divergence = (opt.beta * kl(log_p, log_m) + (1 - opt.beta) * kl(log_q, log_m)) * opt.temperature**2
        return divergence, {"jsd": token_metric(divergence)}
