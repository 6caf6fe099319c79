"""Policy-gradient math for on-policy distillation, on plain tensors.

Per-token tensors are ``[B, T]`` (or flat ``[N]``); ``mask`` marks the sampled tokens up to and
including the first EOS (a prefix of each row). With r_t = log p(y_t) − log q_old(y_t) (teacher
over sampling-time student) these give the rewards, their discounted and normalised sums to go, the
importance weights of teacher-mixed sampling and the PPO-clipped surrogate; ``kdtool.objectives.minillm``
combines them as the MiniLLM paper does (and an objective with a discount of 0 gets per-token
advantages, as in on-policy distillation).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    from kdtool.lazy import torch


def token_rewards(
    teacher_logprobs: Tensor,
    old_logprobs: Tensor,
    mask: Tensor,
    scaling: float = 1.0,
    clip: float | None = None,
) -> Tensor:
    """r_t = clip((log p(y_t) − log q_old(y_t)) / scaling, ±clip), 0 outside the mask. ``[B, T]``."""
    rewards = (teacher_logprobs - old_logprobs) / scaling
    if clip is not None:
        rewards = rewards.clamp(-clip, clip)
    return rewards * mask


def rewards_to_go(
    rewards: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    include_current: bool = False,
    length_norm: bool = False,
    weights: Tensor | None = None,
) -> Tensor:
    """The long-term advantage A_t of each sampled token. ``[B, T] -> [B, T]``.

    With H_t = r_t + γ · w_{t+1} · H_{t+1} (H past the end = 0; w ≡ 1 unless per-decision
    importance weights are given):

        include_current = False (paper):   A_t = γ · w_{t+1} · H_{t+1}   = R_{t+1}
        include_current = True (official): A_t = H_t                     = R_t

    ``length_norm`` divides A_t by the number of rewards it sums (T − t + 1, resp. T − t;
    at least 1): the paper's R^Norm and the official code's division by the remaining length.
    """
    mask = mask.to(rewards.dtype)
    w = torch.ones_like(rewards) if weights is None else weights * mask
    width = rewards.shape[-1]
    future = torch.zeros_like(rewards)  # γ · w_{t+1} · H_{t+1}
    running = torch.zeros_like(rewards[..., 0])
    for t in reversed(range(width)):
        future[..., t] = running
        running = (rewards[..., t] + running) * mask[..., t]  # H_t
        running = gamma * w[..., t] * running  # what position t − 1 sees
    advantages = (rewards + future) if include_current else future
    if length_norm:
        remaining = mask.flip(-1).cumsum(-1).flip(-1)  # T − t + 1 on valid positions
        count = remaining if include_current else remaining - 1
        advantages = advantages / count.clamp(min=1)
    return advantages * mask


def masked_whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x − mean) / std over the masked entries only (0 outside the mask)."""
    mask = mask.bool()
    picked = values[mask]
    if picked.numel() < 2:
        return torch.zeros_like(values)
    mean, var = picked.mean(), picked.var(unbiased=False)
    return ((values - mean) * torch.rsqrt(var + eps)).masked_fill(~mask, 0.0)


def prefix_weights(weights: Tensor, mask: Tensor) -> Tensor:
    """c_t = Π_{s<t} w_s: the exact importance weight of the prefix y_<t. ``[B, T]``."""
    log_w = weights.clamp(min=1e-30).log() * mask
    return (log_w.cumsum(-1) - log_w).exp()


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    weights: Tensor,
    clip_eps: float | None,
) -> tuple[Tensor, Tensor]:
    """PPO-clipped surrogate per token (official ``_pg_loss``), differentiable in ``logprobs``.

        ρ_t = exp(log q_θ(y_t) − log q_old(y_t)) · w_t        (= q_θ / p̃ under mixing)
        L_t = max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε, 1 + ε))

    At θ = θ_old, ∇L_t = −A_t w_t ∇ log q_θ(y_t): the importance-weighted policy gradient.

    Returns:
        ``(loss, clipped)``: per-token losses and where the clipped branch is the active one.
    """
    ratio = (logprobs - old_logprobs).exp() * weights
    unclipped = -advantages * ratio
    if clip_eps is None:
        return unclipped, torch.zeros_like(unclipped, dtype=torch.bool)
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).detach()
