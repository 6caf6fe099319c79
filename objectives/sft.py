"""sft — supervised fine-tuning, no teacher.

    L = mean_t −log q_t(g)

The "SFT w/o KD" baseline, and how the demo trains its teacher.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kdtool.divergence import gather_target, log_softmax
from kdtool.objective import Metrics, NoOptions, Objective, token_metric
from kdtool.teacher import TeacherSignal

if TYPE_CHECKING:
    from torch import Tensor


class SFT(Objective[NoOptions]):
    name = "sft"
    description = "Cross-entropy on the reference response; no teacher (baseline)."
    needs_teacher = False

    def token_losses(
        self, student_logits: Tensor, teacher: TeacherSignal, labels: Tensor, stats: dict[str, Any]
    ) -> tuple[Tensor, Metrics]:
        ce = -gather_target(log_softmax(student_logits), labels)  # [N]
        return ce, {"ce": token_metric(ce)}
