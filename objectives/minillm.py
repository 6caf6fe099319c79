"""minillm — MiniLLM (Gu et al., ICLR 2024, arXiv 2306.08543): on-policy sequence-level reverse KL.

    min_θ  L(θ) = KL[q_θ(y|x) ‖ p(y|x)],   y sampled from the student (mixed with the teacher).

With r_t = log p(y_t|y_<t, x) − log q_θ(y_t|y_<t, x) and R_t = Σ_{t'≥t} r_{t'}, the policy gradient
splits into (paper eq. 4–5)

    ∇L = Σ_t ∇ KL(q_θ(·|y_<t, x) ‖ p(·|y_<t, x))        (∇L)_Single: exact over the vocabulary
       − E_{y∼q_θ} Σ_t R_{t+1} ∇ log q_θ(y_t|y_<t, x)     (∇L)_Long

and is stabilised by four tricks, each one option below:
  1. single-step decomposition (``single_step``);
  2. teacher-mixed sampling y_t ~ p̃ = α·p + (1 − α)·q_θ with importance weights w_t = q_θ(y_t)/p̃(y_t)
     (``alpha``, ``importance_weights``);
  3. length normalisation of the future reward (``length_norm``);
  4. PPO-style ratio clipping over several inner epochs per rollout buffer (``clip_eps``, ``inner_epochs``);
plus a language-modelling loss on a corpus (``lm_loss``, ``lm_data``): L = L_MiniLLM + L_PT.

The official code (microsoft/LMOps, ``minillm/``) differs from the paper in places; every difference
is a named option, and the defaults follow the official code (it produced the paper's numbers):
rewards are scaled by 1/0.5 and clipped to ±100, the future reward *includes* r_t and is discounted by
γ = 0.95, advantages are whitened, and the single-step term is not multiplied by w_t.

With ``include_current_reward=false, gamma=1, length_norm=false, whiten=false, reward_scaling=1,
reward_clip=null, clip_eps=null, normalise_by=sequences`` and either ``alpha=0`` or
``importance_weights=per_decision``, the first PPO step's gradient is an unbiased estimate of ∇L;
``tests/test_minillm_enumeration.py`` checks this against enumeration on a toy.

The math lives in plain functions on tensors (``kdtool.policy_gradient``: ``token_rewards``,
``rewards_to_go``, ``masked_whiten``, ``prefix_weights``, ``policy_loss``; here ``minillm_token_losses``)
so it is tested without models. The
class adds the options and the hooks of the rollout step (``kdtool.onpolicy.RolloutStep``), which
samples, buffers and serves the rollouts (``kdtool.rollout``) and computes ``token_losses`` at the
sampled tokens with the chunked engine, the buffer's per-token tensors arriving as ``stats``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from kdtool.objectives.forward_kl import ForwardKL
from kdtool.objectives.sft import SFT
from pydantic import Field

from kdtool.divergence import kl
from kdtool.objective import Metrics, Objective, ObjectiveOptions, token_metric
from kdtool.policy_gradient import masked_whiten, policy_loss, prefix_weights, rewards_to_go, token_rewards
from kdtool.rollout_spec import LMTerm, RolloutSettings
from kdtool.teacher import TeacherSignal

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from kdtool.context import RunSettings
    from kdtool.sampling import Rollout
else:
    from kdtool.lazy import torch

# --------------------------------------------------------------------------------------------
# The per-token loss (the rewards, advantages and weights come from kdtool.policy_gradient)
# --------------------------------------------------------------------------------------------


def minillm_token_losses(
    logprobs: Tensor,
    step_kl: Tensor | None,
    tokens: dict[str, Tensor],
    clip_eps: float | None,
    single_step_weight: float,
) -> tuple[Tensor, Metrics]:
    """Per-token MiniLLM loss on N sampled tokens (everything but the LM term).

        loss_t = c_t · max(−A_t ρ_t, −A_t clip(ρ_t)) + β · s_t · KL(q_θ(·|y_<t) ‖ p(·|y_<t))

    Args:
        logprobs: ``[N]`` log q_θ(y_t | y_<t) under the current parameters (with grad).
        step_kl: ``[N]`` single-step KL under the current parameters, or ``None`` (term off).
        tokens: the rollout buffer's per-token tensors ``[N]``: ``old_logprobs``, ``advantages``,
            ``ratio_weights`` (w_t), ``prefix_weights`` (c_t) and ``single_step_weights`` (s_t).
        clip_eps: PPO clip range (``None`` = no clipping).
        single_step_weight: β.
    """
    pg, clipped = policy_loss(
        logprobs, tokens["old_logprobs"], tokens["advantages"], tokens["ratio_weights"], clip_eps
    )
    losses = tokens["prefix_weights"] * pg
    metrics: Metrics = {"pg_loss": token_metric(pg), "clip_fraction": token_metric(clipped.float())}
    if step_kl is not None:
        losses = losses + single_step_weight * tokens["single_step_weights"] * step_kl
        metrics["single_step_kl"] = token_metric(step_kl)
    return losses, metrics


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


class MiniLLMOptions(ObjectiveOptions):
    # sampling
    alpha: float = Field(
        0.2, ge=0, le=1, description="Teacher-mix weight α: sample from α·p + (1−α)·q (paper & official 0.2)."
    )
    temperature: float = Field(1.0, gt=0, description="Student sampling temperature τ (official 1).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the proposal (official 1 = off).")
    top_k: int = Field(0, ge=0, description="Top-k sampling of the proposal (official 0 = off).")
    max_new_tokens: int = Field(
        256, gt=0, description="Max sampled tokens per response, also capped by max_length (official 256)."
    )
    rollout_batch_size: int = Field(
        256, gt=0, description="Rollouts collected per buffer (official 256 = 16/GPU × 16 GPUs)."
    )
    mini_batch_size: int | None = Field(
        None, gt=0, description="Rollouts per PPO micro-batch (default: --batch-size)."
    )
    inner_epochs: int = Field(4, gt=0, description="PPO epochs over each rollout buffer (official 4).")
    # rewards and advantages
    reward_scaling: float = Field(
        0.5, gt=0, description="Rewards are divided by this (official 0.5; paper: 1 = none)."
    )
    reward_clip: float | None = Field(
        100.0, gt=0, description="Clip scaled rewards to ±this (official 100; null = off)."
    )
    gamma: float = Field(
        0.95, ge=0, le=1, description="Discount γ of future rewards (official 0.95; paper 1)."
    )
    include_current_reward: bool = Field(
        True,
        description="Advantage R_t includes r_t (official) instead of R_{t+1} (paper; unbiased with single_step).",
    )
    length_norm: bool = Field(
        True, description="Divide the future reward by its number of terms (paper & official)."
    )
    whiten: bool = Field(
        True,
        description="Whiten advantages over the rollout buffer (official, per mini-batch there; paper: no).",
    )
    # PPO
    clip_eps: float | None = Field(
        0.2, gt=0, description="PPO clip range ε of the ratio q_θ/p̃ (official 0.2; null = no clipping)."
    )
    importance_weights: Literal["token", "per_decision", "none"] = Field(
        "token",
        description="Correct teacher-mixed sampling with the per-token w_t = q/p̃ (paper & official; biased "
        "beyond one token), exact per-decision prefix products (kdtool; unbiased), or not at all.",
    )
    # single-step term
    single_step: bool = Field(True, description="Add the exact single-step KL term (paper & official).")
    single_step_weight: float = Field(1.0, ge=0, description="Weight of the single-step term (official 1).")
    single_step_importance: bool = Field(
        False, description="Multiply the single-step term by w_t (paper) or not (official)."
    )
    # language-modelling term
    lm_loss: bool = Field(True, description="Add the LM loss L_PT on lm_data (paper & official).")
    lm_weight: float = Field(1.0, ge=0, description="Weight of L_PT (official lm_coef 1).")
    lm_kd_ratio: float = Field(
        0.5,
        ge=0,
        le=1,
        description="L_PT = (1−r)·CE + r·cross-entropy to the teacher (official kd_ratio 0.5).",
    )
    lm_data: str | None = Field(
        None,
        description="LM corpus: .txt (a document per line), JSONL with 'text', or instruction data "
        "(default: the training responses).",
    )
    lm_batch_size: int | None = Field(
        None, gt=0, description="LM examples per micro-batch (default: --batch-size)."
    )
    normalise_by: Literal["tokens", "sequences"] = Field(
        "tokens",
        description="Divide the loss by response tokens (official) or by sequences (the exact "
        "sequence-level gradient).",
    )


# --------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------


class MiniLLM(Objective[MiniLLMOptions]):
    name = "minillm"
    description = (
        "MiniLLM: on-policy sequence-level reverse KL (policy gradient, teacher mixing, PPO clip, LM loss)."
    )
    needs_rollouts = True
    scores_references = False

    # -- the loss at the sampled tokens ---------------------------------------------------

    def token_losses(
        self, student_logits: Tensor, teacher: TeacherSignal, labels: Tensor, stats: dict[str, Any]
    ) -> tuple[Tensor, Metrics]:
        """``minillm_token_losses`` at N sampled tokens y_t (``labels``); ``stats`` holds the rollout
        buffer's per-token tensors for these rows (``rollout_tensors``)."""
        o = self.options
        log_q = torch.log_softmax(student_logits.float() / o.temperature, dim=-1)  # [n, V]
        logprobs = log_q.gather(-1, labels[:, None]).squeeze(-1)  # log q_θ(y_t | y_<t)
        step_kl = kl(log_q, teacher.dense_log_probs())  # KL(q_θ(·|y_<t) ‖ p(·|y_<t))
        losses, metrics = minillm_token_losses(
            logprobs, step_kl if o.single_step else None, stats, o.clip_eps, o.single_step_weight
        )
        metrics.setdefault("single_step_kl", token_metric(step_kl))  # logged even when the term is off
        metrics["reward"] = token_metric(stats["rewards"])
        metrics["importance_weight"] = token_metric(stats["ratio_weights"])
        return losses, metrics

    def micro_batch_count(self, n_tokens: Tensor, n_sequences: Tensor) -> Tensor:
        """Response tokens (``normalise_by=tokens``, official) or sequences (the exact gradient)."""
        return n_tokens if self.options.normalise_by == "tokens" else n_sequences

    # -- the rollout step's hooks ---------------------------------------------------------

    def rollout_settings(self, settings: RunSettings) -> RolloutSettings:
        o = self.options
        return RolloutSettings(
            max_new_tokens=o.max_new_tokens,
            rollout_batch_size=o.rollout_batch_size,
            mini_batch_size=o.mini_batch_size or settings.batch_size,
            inner_epochs=o.inner_epochs,
            alpha=o.alpha,
            temperature=o.temperature,
            top_k=o.top_k,
            top_p=o.top_p,
        )

    def rollout_tensors(self, rollout: Rollout) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Per-token tensors ``[B, T]`` of one ``Rollout`` (advantages not yet whitened), and the
        per-sequence reverse-KL estimate Σ_t c_t KL_t (exact prefix weights: unbiased under mixing)."""
        o = self.options
        mask = rollout.response_mask.float()
        old = rollout.student_logprobs
        assert rollout.teacher_logprobs is not None and rollout.step_kl is not None
        w = rollout.importance_weights if o.importance_weights != "none" else torch.ones_like(old)
        prefix = prefix_weights(w, mask) if o.importance_weights == "per_decision" else torch.ones_like(old)
        rewards = token_rewards(rollout.teacher_logprobs, old, mask, o.reward_scaling, o.reward_clip)
        adv = rewards_to_go(
            rewards,
            mask,
            o.gamma,
            o.include_current_reward,
            o.length_norm,
            weights=w if o.importance_weights == "per_decision" else None,
        )
        if o.importance_weights == "per_decision":
            single = prefix
        elif o.importance_weights == "token" and o.single_step_importance:
            single = w
        else:
            single = torch.ones_like(old)
        raw = (rollout.teacher_logprobs - old) * mask
        per_token = {
            "old_logprobs": old,
            "advantages": adv,
            "ratio_weights": w,
            "prefix_weights": prefix,
            "single_step_weights": single,
            "rewards": raw,
        }
        valid = rollout.response_mask
        seq_kl = (prefix_weights(rollout.importance_weights, valid.float()) * rollout.step_kl * valid).sum(1)
        return per_token, {"rkl": seq_kl}

    def finish_buffer(self, tokens: dict[str, list[Tensor]]) -> None:
        """Whiten the advantages over all tokens of a full buffer (``tokens``: per-token tensors, one
        per response; the official code whitens each mini-batch, padding included; the buffer is
        the larger and cleaner sample)."""
        if not self.options.whiten or not tokens.get("advantages"):
            return
        lengths = [len(a) for a in tokens["advantages"]]
        flat = torch.cat(tokens["advantages"])
        white = masked_whiten(flat, torch.ones_like(flat, dtype=torch.bool))
        tokens["advantages"] = list(white.split(lengths))

    def lm_term(self) -> LMTerm | None:
        """L_PT = (1 − r)·CE + r·cross-entropy to the teacher on ``lm_data`` (``None`` when off)."""
        o = self.options
        if not o.lm_loss or o.lm_weight <= 0:
            return None
        r = o.lm_kd_ratio
        lm: Objective[Any] = ForwardKL(ce_weight=1 - r) if r > 0 else SFT()
        return LMTerm(lm, o.lm_weight, o.lm_data, o.lm_batch_size)


__all__ = ["MiniLLM", "MiniLLMOptions", "minillm_token_losses"]
