"""THE enumeration test: MiniLLM's sampled gradient is the gradient of KL[q_θ(y|x) ‖ p(y|x)].

Toy: vocabulary 4 (EOS + 3 words), responses of at most 3 tokens, so the 40 complete responses
can be enumerated. Student and teacher are ``TableLM``s (free logits per prefix). The exact
reverse KL and its gradient come from enumeration + autograd; the estimate runs the objective's
own code path (``collect`` → rollout buffer → ``micro_batch_loss`` → backward), K independent
times, and every gradient coordinate must lie within Z standard errors of the exact one.

Tolerance: with K = 25 estimates the per-coordinate z-score follows a t-distribution with 24
degrees of freedom; P(|t| > 5) ≈ 4e-5 per coordinate, ≈ 2e-3 over the 52 coordinates the
gradient touches, and the seeds are fixed. Biased variants (the controls below) reach z > 20 at full size,
so the test has the power to fail (z > 11 even with a sixth of the samples).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from kdtool.objectives.minillm import MiniLLM, MiniLLMOptions

from kdtool.onpolicy import RolloutStep
from kdtool.rollout import collate, collect
from toy_lm import EOS, TableLM, exact_reverse_kl, prompt_batch, toy_context

V, PROMPT = 4, [1]
K, B, Z = 25, 300, 5.0
# The settings under which the estimator is unbiased: no PPO clipping, no length normalisation,
# γ = 1, no whitening, no reward scaling/clipping, and the loss normalised per sequence.
PLAIN = dict(
    alpha=0.0,
    clip_eps=None,
    length_norm=False,
    gamma=1.0,
    whiten=False,
    reward_scaling=1.0,
    reward_clip=None,
    lm_loss=False,
    normalise_by="sequences",
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: 1 thread is fastest, and exact


def gradient_check(
    options: dict[str, Any], max_new: int = 3, seed: int = 0, k: int = K, b: int = B
) -> tuple[float, float]:
    """(max z-score over coordinates, relative error of the mean) of K sampled gradients."""
    student, teacher = TableLM(V, 1 + max_new, seed=1), TableLM(V, 1 + max_new, seed=2)
    teacher.requires_grad_(False)
    (exact,) = torch.autograd.grad(exact_reverse_kl(student, teacher, PROMPT, max_new), student.head.weight)
    objective = MiniLLM(MiniLLMOptions(rollout_batch_size=b, max_new_tokens=max_new, **PLAIN | options))
    ctx = toy_context(student, teacher, seed)
    prompts = prompt_batch(PROMPT, b)
    grads = []
    for _ in range(k):
        buffer = collect(
            iter([prompts]), ctx, objective.rollout_settings(ctx.settings), objective.rollout_tensors
        )
        objective.finish_buffer(buffer.tokens)
        loss_sum, count, _ = RolloutStep(objective).loss(ctx, collate(buffer, list(range(b)), EOS))
        student.zero_grad()
        (loss_sum / count).backward()
        grads.append(student.head.weight.grad.clone())
    g = torch.stack(grads)
    mean, se = g.mean(0), g.std(0) / k**0.5
    touched = (exact != 0) | (se > 0)
    z = (mean - exact).abs()[touched] / (se[touched] + 1e-12)
    return float(z.max()), float((mean - exact).norm() / exact.norm())


def test_single_step_plus_long_term_is_unbiased():
    """Paper eq. 5: exact single-step KL + future reward R_{t+1} (current reward excluded)."""
    z, rel = gradient_check(dict(single_step=True, include_current_reward=False))
    assert z < Z, (z, rel)


def test_plain_reinforce_is_unbiased():
    """Without the decomposition: −E Σ_t R_t ∇ log q_θ(y_t) (R_t includes r_t)."""
    z, rel = gradient_check(dict(single_step=False, include_current_reward=True))
    assert z < Z, (z, rel)


def test_teacher_mixed_sampling_with_exact_importance_weights_is_unbiased():
    """α = 0.3: samples come from α·p + (1 − α)·q; per-decision importance weights
    (prefix products of w_t = q/p̃) make the estimate match the on-policy gradient again."""
    z, rel = gradient_check(dict(alpha=0.3, importance_weights="per_decision", include_current_reward=False))
    assert z < Z, (z, rel)


def test_per_token_importance_weights_are_exact_for_one_token_responses():
    """The paper's (and official code's) per-token weight w_t replaces the product over the
    sequence; it is exact when a response is a single token."""
    z, rel = gradient_check(
        dict(
            alpha=0.3, importance_weights="token", single_step_importance=True, include_current_reward=False
        ),
        max_new=1,
    )
    assert z < Z, (z, rel)


@pytest.mark.parametrize(
    "options",
    [
        # the official code's R_t *and* the single-step term count r_t twice
        dict(single_step=True, include_current_reward=True),
        # mixed samples without any correction
        dict(alpha=0.3, importance_weights="none", include_current_reward=False),
        # the per-token approximation of the sequence importance weight, over 3 tokens
        dict(
            alpha=0.3, importance_weights="token", single_step_importance=True, include_current_reward=False
        ),
    ],
    ids=["current-reward-twice", "mixing-unweighted", "per-token-weights"],
)
def test_biased_variants_are_detected(options):
    """Controls: the same check rejects estimators that are biased by construction."""
    z, _ = gradient_check(options, k=15, b=100)  # a sixth of the samples is enough to see these
    assert z > Z, z
