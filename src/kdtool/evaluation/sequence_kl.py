"""The sequence-level reverse KL[q_θ(y|x) ‖ p(y|x)] of a student to its teacher, estimated on samples."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from kdtool.sampling import _device, left_pad, sample


@torch.no_grad()
def sequence_reverse_kl(
    student: Any,
    teacher: Any,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    *,
    eos_token_id: int | None,
    pad_token_id: int,
    max_new_tokens: int,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """Per-prompt estimate of the sequence-level reverse KL[q_θ(y|x) ‖ p(y|x)] (nats).

    Samples y ~ q_θ (τ = 1, no truncation) and returns Σ_t KL(q_θ(·|y_<t, x) ‖ p(·|y_<t, x)):
    by the chain rule its expectation is exactly the sequence-level KL, with lower variance
    than Σ_t log q/p of the sampled tokens.

    Returns:
        ``[B]`` one estimate per prompt (average them for the KL).
    """
    was_training = student.training
    student.eval()
    try:
        out = sample(
            student,
            prompt_ids,
            prompt_mask,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            max_new_tokens=max_new_tokens,
            teacher=teacher,
            generator=generator,
            vocab_size=vocab_size,
        )
    finally:
        student.train(was_training)
    assert out.step_kl is not None
    return out.step_kl.sum(1)


def measure_reverse_kl(
    student: Any,
    teacher: Any,
    prompts: Sequence[Sequence[int] | Tensor],
    *,
    eos_token_id: int,
    pad_token_id: int,
    max_new_tokens: int,
    batch_size: int = 64,
    seed: int = 0,
    vocab_size: int | None = None,
) -> tuple[float, float]:
    """Sequence-level reverse KL[q_θ ‖ p] on a set of prompts: (mean over prompts, standard error).

    Each prompt gets one student sample (seeded by ``seed``, so two models are compared on the
    same random stream) and the estimate of ``sequence_reverse_kl``.
    """
    device = _device(student)
    g = torch.Generator(device=device).manual_seed(seed)
    estimates = []
    for lo in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[lo : lo + batch_size], pad_token_id)
        estimates.append(
            sequence_reverse_kl(
                student,
                teacher,
                ids.to(device),
                mask.to(device),
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
                max_new_tokens=max_new_tokens,
                generator=g,
                vocab_size=vocab_size,
            ).cpu()
        )
    values = torch.cat(estimates).double()
    return float(values.mean()), float(values.std() / max(1, values.numel()) ** 0.5)
