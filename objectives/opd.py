"""opd — on-policy distillation as in Qwen3's strong-to-weak distillation and the Tinker cookbook.

The student samples y ~ q_θ(·|x). Every sampled token's advantage is its own reverse-KL reward,
with no sum over later tokens (discount 0):

    A_t = r_t = log p(y_t | y_<t, x) − log q_old(y_t | y_<t, x)

and the update is the importance-sampled policy gradient, loss_t = −A_t · q_θ(y_t)/q_old(y_t)
(PPO-clipped when ``clip_eps`` is set). At θ = θ_old its expectation at each sampled prefix is the
exact gradient of the per-position reverse KL, minillm's single-step term:

    E_{y_t ~ q}[−(log p − log q)(y_t) ∇ log q_θ(y_t)] = ∇_θ Σ_v q_θ(v) (log q_θ(v) − log p(v))

(the prefixes are the student's own samples; their distribution is not differentiated).

It is ``minillm`` with the option set ``MINILLM_EQUIVALENT``: the same sampler, rollout stream and
chunked loss; ``tests/test_opd.py`` checks the equivalence and, by enumeration on a toy, that the
mean of its gradient estimates is the exact per-position reverse-KL gradient.
"""

from __future__ import annotations

from typing import Literal

from kdtool.objectives.minillm import MiniLLM, MiniLLMOptions
from pydantic import Field

# The minillm options that make it on-policy distillation (everything else keeps minillm's default).
MINILLM_EQUIVALENT = dict(
    alpha=0.0,
    gamma=0.0,
    include_current_reward=True,
    length_norm=False,
    whiten=False,
    reward_scaling=1.0,
    reward_clip=None,
    clip_eps=None,
    importance_weights="none",
    single_step=False,
    lm_loss=False,
    inner_epochs=1,
    rollout_batch_size=64,
)


class OPDOptions(MiniLLMOptions):
    alpha: float = Field(
        0.0, ge=0, le=1, description="Teacher-mix weight of the sampler (0: the student's own)."
    )
    gamma: float = Field(0.0, ge=0, le=1, description="Discount of later rewards (0: per-token advantage).")
    include_current_reward: bool = Field(True, description="The advantage is the token's own reward r_t.")
    length_norm: bool = Field(False, description="Divide the future reward by its number of terms.")
    whiten: bool = Field(False, description="Whiten advantages over the rollout buffer.")
    reward_scaling: float = Field(1.0, gt=0, description="Rewards are divided by this.")
    reward_clip: float | None = Field(None, gt=0, description="Clip scaled rewards to ±this (null = off).")
    clip_eps: float | None = Field(
        None, gt=0, description="PPO clip range of q_θ/q_old (null: plain importance sampling)."
    )
    importance_weights: Literal["token", "per_decision", "none"] = Field(
        "none", description="Teacher-mixing correction (none: nothing is mixed)."
    )
    single_step: bool = Field(False, description="Add minillm's exact single-step KL term.")
    lm_loss: bool = Field(False, description="Add minillm's language-modelling loss.")
    inner_epochs: int = Field(1, gt=0, description="Passes over each rollout buffer (1: on-policy).")
    rollout_batch_size: int = Field(64, gt=0, description="Rollouts collected per buffer.")


class OnPolicyDistillation(MiniLLM):
    name = "opd"
    description = (
        "On-policy distillation (Qwen3, Tinker): per-token reverse-KL reward on the student's samples, "
        "no discount, importance-sampled update."
    )
    Options = OPDOptions
