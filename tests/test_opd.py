"""opd (on-policy distillation, Qwen3 / Tinker): the minillm option set it names, and, by enumeration
on a toy, that the mean of its sampled gradients is the exact per-position reverse-KL gradient at
the student's own prefixes — minillm's single-step term, summed over the vocabulary."""

from __future__ import annotations

import pytest
import torch
from kdtool.objectives.minillm import MiniLLM, MiniLLMOptions
from kdtool.objectives.opd import MINILLM_EQUIVALENT, OnPolicyDistillation, OPDOptions

from kdtool.onpolicy import RolloutStep
from kdtool.registry import available
from kdtool.rollout import collate, collect
from toy_lm import EOS, TableLM, all_responses, prompt_batch, response_batch, toy_context

V, PROMPT, MAX_NEW = 4, [1], 3
K, B, Z = 25, 300, 5.0


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: 1 thread is fastest, and exact


def models():
    student, teacher = TableLM(V, 1 + MAX_NEW, seed=1), TableLM(V, 1 + MAX_NEW, seed=2)
    teacher.requires_grad_(False)
    return student, teacher


def sampled_loss(objective, ctx, b: int) -> torch.Tensor:
    """The objective's own path: collect → buffer → micro-batch loss / count."""
    buffer = collect(
        iter([prompt_batch(PROMPT, b)]),
        ctx,
        objective.rollout_settings(ctx.settings),
        objective.rollout_tensors,
    )
    objective.finish_buffer(buffer.tokens)
    loss_sum, count, _ = RolloutStep(objective).loss(ctx, collate(buffer, list(range(b)), EOS))
    return loss_sum / count


def test_registered_and_equal_to_its_minillm_option_set():
    assert available()["opd"] is OnPolicyDistillation and OnPolicyDistillation.needs_rollouts
    assert OPDOptions().model_dump() == MiniLLMOptions(**MINILLM_EQUIVALENT).model_dump()
    student, teacher = models()
    losses = []
    for objective in (OnPolicyDistillation(), MiniLLM(MiniLLMOptions(**MINILLM_EQUIVALENT))):
        objective.options = objective.options.model_copy(update={"max_new_tokens": MAX_NEW})
        losses.append(sampled_loss(objective, toy_context(student, teacher, seed=0), 64))
    assert torch.equal(losses[0], losses[1])


def exact_per_position_kl_gradient(student, teacher) -> torch.Tensor:
    """∇_θ E_{y∼q}[Σ_t KL(q_θ(·|y_<t) ‖ p(·|y_<t))] with the prefixes' probabilities held fixed,
    by enumerating every complete response."""
    ids, mask = response_batch(PROMPT, all_responses(V, MAX_NEW))
    at = slice(len(PROMPT) - 1, -1)  # the positions that predict each response token
    log_q = torch.log_softmax(student(ids).logits[:, at], -1)  # [S, T, V]
    log_p = torch.log_softmax(teacher(ids).logits[:, at], -1)
    step_kl = (log_q.exp() * (log_q - log_p)).sum(-1)  # [S, T]
    seq_logq = (log_q.gather(-1, ids[:, len(PROMPT) :, None]).squeeze(-1) * mask).sum(1)
    weight = seq_logq.exp().detach()  # q(y), not differentiated
    (grad,) = torch.autograd.grad((weight[:, None] * step_kl * mask).sum(), student.head.weight)
    return grad


def gradient_check(options: dict, k: int = K, b: int = B) -> float:
    """Max z-score over coordinates of the mean of k sampled gradients against the exact one."""
    student, teacher = models()
    exact = exact_per_position_kl_gradient(student, teacher)
    objective = OnPolicyDistillation(OPDOptions(max_new_tokens=MAX_NEW, normalise_by="sequences", **options))
    grads = []
    for seed in range(k):
        student.zero_grad()
        sampled_loss(objective, toy_context(student, teacher, seed), b).backward()
        grads.append(student.head.weight.grad.clone())
    g = torch.stack(grads)
    mean, se = g.mean(0), g.std(0) / k**0.5
    touched = (exact != 0) | (se > 0)
    return float(((mean - exact).abs()[touched] / (se[touched] + 1e-12)).max())


def test_mean_gradient_is_the_exact_per_position_reverse_kl_gradient():
    assert gradient_check({}) < Z


def test_a_discount_above_zero_is_detected():
    """Control: summing later rewards (γ = 1) estimates the sequence-level gradient instead, which the
    same check rejects, so it has the power to fail."""
    assert gradient_check({"gamma": 1.0}, k=15, b=100) > Z
