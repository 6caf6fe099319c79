"""fkl — word-level KD (Hinton et al.; MiniLLM's "KD" baseline).

    L = (1 − w) · τ² · mean_t KL(p_t^τ ‖ q_t^τ) + w · mean_t CE(q_t, g)

p = teacher, q = student, τ = temperature, g = target token, w = ``ce_weight``.
With a sparse teacher (top-k cache), p is the softmax of the k stored logits (zero elsewhere).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from kdtool.divergence import gather_target, kl, kl_and_logit_grad, log_softmax
from kdtool.objective import Metrics, Objective, ObjectiveOptions, token_metric
from kdtool.teacher import TeacherSignal

if TYPE_CHECKING:
    from torch import Tensor


class ForwardKLOptions(ObjectiveOptions):
    temperature: float = Field(1.0, gt=0, description="Softmax temperature τ for both models (loss × τ²).")
    ce_weight: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Weight w of cross-entropy on the target; MiniLLM's KD baseline uses 0.5.",
    )


class ForwardKL(Objective[ForwardKLOptions]):
    name = "fkl"
    description = "Forward KL(teacher ‖ student) per token (word-level KD); optional CE mix."
    supports_sparse = True

    def token_losses(
        self, student_logits: Tensor, teacher: TeacherSignal, labels: Tensor, stats: dict[str, Any]
    ) -> tuple[Tensor, Metrics]:
        opt = self.options
        tau = opt.temperature
        log_p = teacher.dense_log_probs(tau)  # [N, V]
        log_q = log_softmax(student_logits, tau)  # [N, V]
        divergence = kl(log_p, log_q) * tau**2  # [N]
        losses = divergence
        metrics: Metrics = {"kl": token_metric(divergence)}
        if opt.ce_weight > 0:
            ce = -gather_target(log_softmax(student_logits), labels)
            losses = (1 - opt.ce_weight) * divergence + opt.ce_weight * ce
            metrics["ce"] = token_metric(ce)
        return losses, metrics

    def token_losses_and_grad(
        self, student_logits: Tensor, teacher: TeacherSignal, labels: Tensor, stats: dict[str, Any]
    ) -> tuple[Tensor, Metrics, Tensor] | None:
        """Without the CE term: ∂L/∂z = τ² · (1/τ) · (q^τ · Σ_v p^τ(v) − p^τ), autograd's values exactly."""
        opt = self.options
        if opt.ce_weight > 0:
            return None  # the engine differentiates the mix by autograd
        tau = opt.temperature
        log_p = teacher.dense_log_probs(tau)  # [N, V]
        log_q = log_softmax(student_logits, tau)  # [N, V]
        kl_tau, grad = kl_and_logit_grad(log_p, log_q, weight=tau**2)  # grad w.r.t. z / τ
        divergence = kl_tau * tau**2  # [N]
        if tau != 1.0:
            grad = grad / tau
        return divergence, {"kl": token_metric(divergence)}, grad.to(student_logits.dtype)
