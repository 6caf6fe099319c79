"""tvd — total variation distance per token.

TVD(p, q) = ½ Σ_v |p(v) − q(v)|
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from kdtool.divergence import log_softmax
from kdtool.objective import Metrics, Objective, ObjectiveOptions, token_metric
from kdtool.teacher import TeacherSignal

if TYPE_CHECKING:
    from torch import Tensor


class TVDOptions(ObjectiveOptions):
    temperature: float = Field(1.0, gt=0, description="Softmax temperature τ for both models.")


class TVD(Objective[TVDOptions]):
    name = "tvd"
    description = "Total variation distance ½Σ|p − q| per token."

    def token_losses(
        self, student_logits: Tensor, teacher: TeacherSignal, labels: Tensor, stats: dict[str, Any]
    ) -> tuple[Tensor, Metrics]:
        tau = self.options.temperature
        p = teacher.dense_log_probs(tau).exp()
        q = log_softmax(student_logits, tau).exp()
        distance = 0.5 * (p - q).abs().sum(-1)
        return distance, {"tvd": token_metric(distance)}
