"""atkd — adaptive teaching KD (Zhong et al., ACL 2024, arXiv 2402.11890; official code WHU-ZQH/ATKD).

Decoupling (as in Decoupled KD), with g the target token and p_g the teacher's probability of it:

    b^p = [p_g, 1 − p_g],   b^q = [q_g, 1 − q_g],   p̂ = p on v ≠ g renormalised,  q̂ likewise
    KL(p ‖ q) = KL(b^p ‖ b^q) + (1 − p_g) · KL(p̂ ‖ q̂)  =  TKD + UnC · DKD

The teacher's uncertainty UnC_t = 1 − p_t(g) splits the valid tokens of a batch: a token is *hard*
when UnC_t ≥ the batch's lower quantile at 1 − ``hard_fraction`` (the median by default, as the
official code's ``torch.median``), *easy* otherwise. Easy tokens only learn the non-target
distribution; hard tokens learn both parts:

    L = λ · mean_easy(DKD) + (1 − λ) · mean_hard(TKD + DKD)        (× τ², as in fkl)

Each mean is over its own group's tokens; DKD is *not* multiplied by UnC. Reverse base:
TKD = KL(b^q ‖ b^p), DKD = KL(q̂ ‖ p̂), split still by the teacher's UnC.

Normalisation. The engine returns Σ_t loss_t and the trainer divides by the step's token count.
``batch_stats`` therefore gives every token the weight N/|its group| (times λ or 1 − λ), so that
Σ_t loss_t / N is exactly L for a micro-batch of N valid tokens. The quantile and the group means
belong to the micro-batch (as in the official code, where each device batch has its own median);
under gradient accumulation a step's loss is Σ_m N_m · L_m / Σ_m N_m, the token-weighted mean of
the micro-batches' ATKD losses (the official HF-Trainer code takes their plain mean; equal when the
micro-batches hold equal token counts). Unlike fkl, ATKD is therefore not invariant to how a step is
cut into micro-batches: batch 8 × accumulation 1 splits by one median, batch 1 × accumulation 8 by eight.

Sparse teacher (top-k cache, ``base=fkl`` only): p is the softmax of the k stored logits. Then
1 − p_g is the mass of the *stored* non-target entries relative to the stored mass (the tail is
dropped, so UnC is underestimated when g is stored; a target outside the top-k has p_g = 0,
UnC = 1, always hard), and p̂ is the teacher's p̂ restricted to the stored entries and renormalised.
A reverse base would need the teacher everywhere the student has mass, so it refuses a sparse signal.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from pydantic import ConfigDict, Field

from kdtool.divergence import kl, upcast
from kdtool.errors import UserError
from kdtool.objective import Metrics, Objective, ObjectiveOptions, token_metric
from kdtool.teacher import TeacherSignal

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    from kdtool.lazy import torch


class ATKDOptions(ObjectiveOptions):
    # ``lambda`` is a Python keyword: the field is ``lambda_``, users write ``lambda``.
    model_config = ConfigDict(populate_by_name=True)

    base: Literal["fkl", "rkl"] = Field(
        "fkl", description="Base divergence: fkl = KL(teacher ‖ student), rkl = KL(student ‖ teacher)."
    )
    lambda_: float = Field(
        0.2, alias="lambda", ge=0, le=1, description="Weight λ of the easy tokens' DKD (hard: 1 − λ)."
    )
    hard_fraction: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Tokens with teacher uncertainty 1 − p(g) at or above the batch quantile at "
        "1 − hard_fraction are hard (0.5 = median, as in the paper).",
    )
    temperature: float = Field(1.0, gt=0, description="Softmax temperature τ for both models (loss × τ²).")


class Decoupled(NamedTuple):
    """One model's distribution at N positions, split at the target token."""

    log_binary: Tensor  # [N, 2]: (log p_g, log(1 − p_g)); log(1 − p_g) = −inf when all mass is on g
    log_hat: Tensor  # [N, V]: log p̂, −inf at g; all −inf where p̂ is undefined (no mass off g)


def decouple(scores: Tensor, labels: Tensor) -> Decoupled:
    """Split a distribution into target-vs-rest and the renormalised rest.

    Works on *scores* (logits / τ, or log-probabilities: any per-row shift) rather than on
    probabilities, so that p̂ stays exact when p_g → 1 (1 − p_g underflows, p̂ does not).

    Args:
        scores: ``[N, V]`` fp32/fp64 scores; ``-inf`` entries have probability 0.
        labels: ``[N]`` target ids.
    """
    target = labels.long().unsqueeze(-1)  # [N, 1]
    rest = scores.scatter(-1, target, float("-inf"))  # [N, V]: the target removed
    has_rest = (rest > float("-inf")).any(-1, keepdim=True)  # [N, 1]
    # logsumexp over an all −inf row is −inf with a NaN gradient: such rows are computed on
    # zeros and their −inf restored, so masked vocabulary entries never poison the backward pass.
    safe_rest = torch.where(has_rest, rest, torch.zeros_like(rest))
    log_rest_mass = torch.logsumexp(safe_rest, -1, keepdim=True)  # [N, 1]
    log_hat = torch.where(has_rest, safe_rest - log_rest_mass, rest)  # [N, V]
    log_z = torch.logsumexp(scores, -1, keepdim=True)  # [N, 1]
    log_target = scores.gather(-1, target) - log_z  # [N, 1]
    minus_inf = torch.full_like(log_z, float("-inf"))
    log_rest = torch.where(has_rest, log_rest_mass - log_z, minus_inf)  # [N, 1]
    return Decoupled(torch.cat([log_target, log_rest], -1), log_hat)


def tkd_dkd(first: Decoupled, second: Decoupled) -> tuple[Tensor, Tensor]:
    """TKD = KL(b^first ‖ b^second) and DKD = KL(first^ ‖ second^), each ``[N]``.

    A row whose ``first`` has no mass off the target gets DKD = 0 (its weight 1 − p_g is 0 in
    KL = TKD + (1 − p_g)·DKD, and there is no non-target distribution to teach).
    """
    return kl(first.log_binary, second.log_binary), kl(first.log_hat, second.log_hat)


def teacher_scores(teacher: TeacherSignal, temperature: float) -> Tensor:
    """Teacher logits / τ ``[N, V]`` (fp32 or fp64); a sparse signal gives its top-k log-probs."""
    return teacher.scores(temperature)


def lower_quantile(values: Tensor, q: float) -> Tensor:
    """The ``q`` quantile with ``interpolation="lower"`` (``q = 0.5``: ``torch.median``), 0-dim."""
    # The epsilon keeps e.g. 0.7 · 10 = 7.000000000000001 and 6.999999999999999 on the same side.
    k = math.floor(q * (values.numel() - 1) + 1e-9)
    return torch.kthvalue(values, k + 1).values


class ATKD(Objective[ATKDOptions]):
    name = "atkd"
    description = "Adaptive teaching KD: target/non-target KL split, hard tokens by teacher uncertainty."
    supports_sparse = True  # with base=fkl only (accepts_sparse)

    @classmethod
    def accepts_sparse(cls, options: ObjectiveOptions) -> bool:
        """Reverse KL to a top-k teacher is infinite: only ``base=fkl`` trains from a cache."""
        return isinstance(options, ATKDOptions) and options.base == "fkl"

    def token_stats(self, teacher: TeacherSignal, labels: Tensor) -> dict[str, Tensor]:
        """Teacher uncertainty ``UnC = 1 − p(g)`` per token, ``{"uncertainty": [n]}``."""
        if teacher.is_sparse and self.options.base == "rkl":
            raise UserError(
                "atkd with base=rkl needs the teacher's full distribution (reverse KL to a top-k "
                "teacher is infinite); use base=fkl with --teacher-cache, or a live --teacher"
            )
        with torch.no_grad():
            log_rest = decouple(teacher_scores(teacher, self.options.temperature), labels).log_binary[:, 1]
        return {"uncertainty": log_rest.exp()}  # exp(log(1 − p_g)): exact even for tiny UnC

    def batch_stats(self, token_stats: dict[str, Tensor]) -> dict[str, Any]:
        """Hard/easy split of all N valid tokens and each token's weight N·λ/|easy| or N·(1 − λ)/|hard|.

        ``uncertainty``, ``hard`` and ``weight`` are ``[N]``; ``threshold`` is 0-dim.
        """
        unc = token_stats["uncertainty"]  # [N]
        n = unc.numel()
        if n == 0:
            empty = unc.new_zeros(0)
            return {
                "uncertainty": empty,
                "hard": empty.bool(),
                "weight": empty,
                "threshold": unc.new_zeros(()),
            }
        threshold = lower_quantile(unc, 1.0 - self.options.hard_fraction)
        hard = unc >= threshold  # [N]
        n_hard = hard.sum().to(unc.dtype)
        n_easy = n - n_hard
        lam = self.options.lambda_
        weight = torch.where(hard, (1 - lam) * n / n_hard.clamp(min=1), lam * n / n_easy.clamp(min=1))
        return {"uncertainty": unc, "hard": hard, "weight": weight, "threshold": threshold}

    def token_losses(
        self, student_logits: Tensor, teacher: TeacherSignal, labels: Tensor, stats: dict[str, Any]
    ) -> tuple[Tensor, Metrics]:
        if "weight" not in stats:  # called on its own: these rows are the whole batch
            stats = self.batch_stats(self.token_stats(teacher, labels))
        tau = self.options.temperature
        p = decouple(teacher_scores(teacher, tau), labels)
        q = decouple(upcast(student_logits) / tau, labels)
        first, second = (p, q) if self.options.base == "fkl" else (q, p)
        tkd, dkd = (x * tau**2 for x in tkd_dkd(first, second))  # [N] each
        hard: Tensor = stats["hard"]
        # where, not a product with the mask: an infinite TKD of an easy token must not become NaN.
        losses = stats["weight"] * torch.where(hard, tkd + dkd, dkd)  # [N]
        metrics: Metrics = {
            "hard_fraction": token_metric(hard),
            "uncertainty": token_metric(stats["uncertainty"]),
            "tkd_hard": group_metric(tkd, hard),
            "dkd_hard": group_metric(dkd, hard),
            "tkd_easy": group_metric(tkd, ~hard),
            "dkd_easy": group_metric(dkd, ~hard),
        }
        return losses, metrics


def group_metric(values: Tensor, member: Tensor) -> tuple[Tensor, Tensor]:
    """(sum over the group's tokens, group size), detached."""
    values = values.detach().float()
    return torch.where(member, values, torch.zeros_like(values)).sum(), member.sum()
