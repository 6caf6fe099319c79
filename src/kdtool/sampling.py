"""Batched sampling with a KV cache: the student (optionally mixed with the teacher) answers prompts.

Used by the rollout stream (``kdtool.rollout``) of on-policy steps and by evaluation.

Two samplers in one loop:

* **student** sampling: y_t ~ q_θ(·|y_<t, x) at temperature τ (optionally top-k / top-p);
* **teacher-mixed** sampling (MiniLLM §2.2): y_t ~ p̃ = α·p(·|y_<t, x) + (1 − α)·q_θ(·|y_<t, x).

Teacher and student step *together*, each with its own KV cache, through plain
``model(input_ids, attention_mask=..., position_ids=..., cache=..., use_cache=True)`` (``past_key_values``
for transformers versions before the rename)
calls, so any Hugging Face causal LM works without a fork of ``generate`` (the official
MiniLLM code patches transformers for this).

Prompts are left-padded (so every row's next token sits in the last column); position ids
are derived from the attention mask so that left padding does not shift positions. Every
call is seeded through a ``torch.Generator``: same generator state, same samples.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from kdtool.divergence import kl, log_mix


@dataclass
class Rollout:
    """A batch of sampled responses and the per-token quantities MiniLLM needs.

    All per-token tensors are ``[B, T]`` with T ≤ ``max_new_tokens``; entries outside
    ``response_mask`` are 0 (log-probs) and must be ignored.

    Attributes:
        prompt_ids: ``[B, P]`` left-padded prompts.
        prompt_mask: ``[B, P]`` 1 on real prompt tokens.
        response_ids: ``[B, T]`` sampled tokens; ``pad_token_id`` after the first EOS.
        response_mask: ``[B, T]`` bool, tokens up to and including the first EOS.
        student_logprobs: ``[B, T]`` log q_old(y_t | y_<t, x): the sampling-time student
            at temperature τ (the PPO anchor).
        teacher_logprobs: ``[B, T]`` log p(y_t | y_<t, x) (``None`` without a teacher).
        proposal_logprobs: ``[B, T]`` log p̃(y_t | y_<t, x) of the distribution actually
            sampled from (after mixing and top-k / top-p); equals ``student_logprobs`` for
            plain student sampling.
        step_kl: ``[B, T]`` exact KL(q_old(·|y_<t, x) ‖ p(·|y_<t, x)) over the vocabulary at
            each sampled prefix (``None`` without a teacher).
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    student_logprobs: Tensor
    teacher_logprobs: Tensor | None
    proposal_logprobs: Tensor
    step_kl: Tensor | None

    @property
    def lengths(self) -> Tensor:
        """``[B]`` response tokens per row (including the first EOS)."""
        return self.response_mask.sum(1)

    @property
    def importance_weights(self) -> Tensor:
        """``[B, T]`` w_t = q_old(y_t) / p̃(y_t) (1 outside the mask)."""
        log_w = (self.student_logprobs - self.proposal_logprobs).masked_fill(~self.response_mask, 0.0)
        return log_w.exp()


def pad_token_id(tokenizer: Any) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS (``load_tokenizer`` sets
    pad = EOS; tokenizers built elsewhere may have neither set)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def left_pad(prompts: Sequence[Sequence[int] | Tensor], pad_id: int) -> tuple[Tensor, Tensor]:
    """Token-id lists (or 1-D tensors) → left-padded ``input_ids`` and ``attention_mask`` ``[B, P]``."""
    rows = [torch.as_tensor(p, dtype=torch.long).flip(0) for p in prompts]
    ids = pad_sequence(rows, batch_first=True, padding_value=pad_id).flip(1)
    mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_value=0).flip(1)
    return ids, mask


def filter_top_k_top_p(log_probs: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Restrict a distribution to its top-k tokens and/or its top-p nucleus, renormalised.

    Args:
        log_probs: ``[B, V]`` normalised log-probabilities.
        top_k: keep the k most likely tokens (0 = all).
        top_p: keep the smallest set whose mass reaches ``top_p`` (1 = all).

    Returns:
        ``[B, V]`` log-probabilities with ``-inf`` outside the kept set.
    """
    if top_k <= 0 and top_p >= 1.0:
        return log_probs  # nothing to cut: keep the values bit-identical (w = 1 exactly at α = 0)
    if top_k > 0 and top_k < log_probs.shape[-1]:
        kth = log_probs.topk(top_k, dim=-1).values[..., -1:]
        log_probs = log_probs.masked_fill(log_probs < kth, float("-inf"))
    if top_p < 1.0:
        sorted_lp, order = log_probs.sort(dim=-1, descending=True)
        mass_before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()
        # A token is kept while the mass *before* it is below top_p: the top token always stays.
        drop_sorted = mass_before >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        log_probs = log_probs.masked_fill(drop, float("-inf"))
    return torch.log_softmax(log_probs, dim=-1)


def mix_log_probs(log_p: Tensor, log_q: Tensor, alpha: float) -> Tensor:
    """log(α·p + (1 − α)·q), exact at α = 0 and α = 1."""
    if alpha <= 0.0:
        return log_q
    if alpha >= 1.0:
        return log_p
    return log_mix(log_p, log_q, alpha)


class _Stepper:
    """One model and its KV cache: feed the prompt once, then one token per step.

    ``call`` runs the model (default: the model itself). Under FSDP2 it is the module the
    wrapper owns, so that its pre-forward hook gathers the root's parameters; ``model`` is
    only inspected (signature, device).
    """

    def __init__(self, model: Any, vocab_size: int | None, out_device: torch.device, call: Any | None = None):
        self.model, self.vocab_size, self.cache = model, vocab_size, None
        self.call = call if call is not None else model
        self.device, self.out_device = _device(model), out_device
        params = inspect.signature(model.forward).parameters
        takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self.takes_positions = "position_ids" in params or takes_kwargs
        # Only the last position's logits are sampled from: without this the prefill makes
        # [B, P, V] logits (transformers >= 4.45; older or custom models compute them all).
        self.keep_last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        # transformers ≥ 5.2x names the KV cache `cache` (in and out); earlier ones `past_key_values`
        self.cache_arg = "cache" if "cache" in params else "past_key_values"

    def __call__(self, ids: Tensor, attention_mask: Tensor, positions: Tensor) -> Tensor:
        """Next-token logits ``[B, V]`` (fp32) after feeding ``ids`` ``[B, n]``."""
        extra = {"position_ids": positions.to(self.device)} if self.takes_positions else {}
        out = self.call(
            input_ids=ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            **{self.cache_arg: self.cache},
            use_cache=True,
            **extra,
            **self.keep_last,
        )
        self.cache = getattr(out, self.cache_arg)
        logits = out.logits[:, -1].float().to(self.out_device)
        return logits[:, : self.vocab_size] if self.vocab_size else logits

    def idle(self, ids: Tensor) -> None:
        """A one-token forward whose output is dropped: it only makes this rank take part in the
        all-gathers of a sharded model while other ranks still decode."""
        if self.call is self.model:  # not behind a wrapper, so not sharded: nothing to take part in
            return
        first = ids[:, :1].to(self.device)
        extra = {"position_ids": torch.zeros_like(first)} if self.takes_positions else {}
        self.call(
            input_ids=first, attention_mask=torch.ones_like(first), use_cache=False, **extra, **self.keep_last
        )


@torch.no_grad()
def sample(
    student: Any,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    *,
    eos_token_id: int | None,
    pad_token_id: int,
    max_new_tokens: int,
    teacher: Any | None = None,
    alpha: float = 0.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
    stop_early: bool = True,
    stop_token_ids: Sequence[int] = (),
    student_call: Any | None = None,
    teacher_call: Any | None = None,
    any_rank: Callable[[bool], bool] | None = None,
) -> Rollout:
    """Sample responses from the student, or from the teacher-mixed proposal when ``alpha > 0``.

    At each step t, with q = softmax(z_S / τ) and p = softmax(z_T):
        p̃_t = top-k/top-p( α·p + (1 − α)·q ),   y_t ~ p̃_t.
    The temperature shapes the student *policy* q; the teacher p is the fixed target.

    Args:
        student: causal LM (``model(input_ids, attention_mask, past_key_values, use_cache)``).
        prompt_ids: ``[B, P]`` left-padded prompts; ``prompt_mask`` marks real tokens.
        eos_token_id: stop token (``None``: never stop, always ``max_new_tokens``).
        pad_token_id: written after a row's first EOS.
        max_new_tokens: response length limit.
        teacher: teacher LM sharing the vocabulary; needed for ``alpha > 0`` and for
            ``teacher_logprobs`` / ``step_kl``.
        alpha: teacher mixing weight α ∈ [0, 1] (0 = pure student sampling).
        temperature, top_k, top_p: student temperature and proposal truncation.
        generator: seeds the sampling (on the student's device).
        vocab_size: compare only the first ``vocab_size`` logits (padded embedding matrices).
        stop_early: stop once every row has emitted EOS (``False``: always ``max_new_tokens``).
        stop_token_ids: further tokens that end a response like EOS (a chat template's end of turn).
        student_call, teacher_call: what runs each model (default: the model); under FSDP2 the
            module its wrapper owns, so that the wrapper's hooks gather the parameters.
        any_rank: with sharded models, reduces "this rank still decodes" over ranks (logical
            or). Every rank then makes one forward pass per model per step until no rank
            decodes; a rank that is done makes idle passes, which sample nothing (its generator
            advances exactly as in a single process), so the all-gathers line up.

    Returns:
        A ``Rollout`` (see its attributes); models are left in the mode they were given in.
    """
    if alpha > 0 and teacher is None:
        raise ValueError("teacher-mixed sampling (alpha > 0) needs a teacher")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    device = prompt_ids.device
    batch = prompt_ids.shape[0]
    mask = prompt_mask.long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, P]: left padding does not shift positions
    stop_list = ([eos_token_id] if eos_token_id is not None else []) + list(stop_token_ids)
    stops = torch.tensor(stop_list, device=device) if stop_list else None
    s_step = _Stepper(student, vocab_size, device, student_call)
    t_step = _Stepper(teacher, vocab_size, device, teacher_call) if teacher is not None else None
    ids = prompt_ids
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    cols: dict[str, list[Tensor]] = {k: [] for k in ("ids", "valid", "lq", "lmix", "lp", "kl")}
    step = 0
    while True:
        decoding = step < max_new_tokens and not (stop_early and step > 0 and bool(finished.all()))
        if not (any_rank(decoding) if any_rank is not None else decoding):
            break
        step += 1
        if not decoding:  # another rank still samples: take part in its all-gathers
            s_step.idle(prompt_ids)
            if t_step is not None:
                t_step.idle(prompt_ids)
            continue
        log_q = torch.log_softmax(s_step(ids, mask, positions) / temperature, dim=-1)  # [B, V]
        log_p = None
        if t_step is not None:
            log_p = torch.log_softmax(t_step(ids, mask, positions), dim=-1)
        log_mix = mix_log_probs(log_p, log_q, alpha) if log_p is not None else log_q
        proposal = filter_top_k_top_p(log_mix, top_k, top_p)
        token = torch.multinomial(proposal.exp(), 1, generator=generator).squeeze(-1)  # [B]
        token = token.masked_fill(finished, pad_token_id)
        pick = token.unsqueeze(-1)
        cols["ids"].append(token)
        cols["valid"].append(~finished)
        cols["lq"].append(log_q.gather(-1, pick).squeeze(-1))
        cols["lmix"].append(proposal.gather(-1, pick).squeeze(-1))
        if log_p is not None:
            cols["lp"].append(log_p.gather(-1, pick).squeeze(-1))
            cols["kl"].append(kl(log_q, log_p))
        if stops is not None:
            finished = finished | torch.isin(token, stops)
        ids = token.unsqueeze(-1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
    valid = torch.stack(cols["valid"], 1)  # [B, T]

    def stacked(key: str) -> Tensor | None:
        if not cols[key]:
            return None
        return torch.stack(cols[key], 1).masked_fill(~valid, 0.0)

    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=torch.stack(cols["ids"], 1),
        response_mask=valid,
        student_logprobs=stacked("lq"),  # type: ignore[arg-type]
        teacher_logprobs=stacked("lp"),
        proposal_logprobs=stacked("lmix"),  # type: ignore[arg-type]
        step_kl=stacked("kl"),
    )


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")
