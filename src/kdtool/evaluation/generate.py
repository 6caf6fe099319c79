"""Generate responses for evaluation: batched, left-padded, KV cache, stop at EOS.

The MiniLLM protocol samples at temperature 1 with top-p 1 and top-k 0 (plain ancestral
sampling), at most 256 new tokens, once per seed in 10, 20, 30, 40, 50. A prediction is the
generated tokens cut at the first EOS, decoded with special tokens skipped, and stripped.

Reproducibility: a seed's outputs depend on the seed, the prompts, ``batch_size`` and the device
(the batch is sampled with one random stream, so regrouping rows changes which draw each gets).
With those fixed, a seed reproduces exactly on CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kdtool.chat import end_of_turn_ids
from kdtool.errors import UserError
from kdtool.sampling import left_pad, pad_token_id

PROTOCOL_SEEDS = (10, 20, 30, 40, 50)


@dataclass(frozen=True)
class Sampling:
    """How to decode. The defaults are the MiniLLM protocol."""

    greedy: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filtering
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.greedy:
            return
        if self.temperature <= 0:
            raise UserError(f"--temperature must be > 0 (got {self.temperature}); use --greedy instead")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"--top-k must be >= 0 (0 disables it), got {self.top_k}")

    def generation_config(self, stop_ids: Sequence[int], pad_id: int) -> Any:
        """A complete ``transformers.GenerationConfig`` for these settings."""
        from transformers import GenerationConfig

        common: dict[str, Any] = dict(
            max_new_tokens=self.max_new_tokens,
            eos_token_id=list(stop_ids),
            pad_token_id=pad_id,
            num_beams=1,
            use_cache=True,
        )
        if self.greedy:
            return GenerationConfig(do_sample=False, **common)
        return GenerationConfig(
            do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, **common
        )

    def to_dict(self) -> dict[str, Any]:
        if self.greedy:
            return {"greedy": True, "max_new_tokens": self.max_new_tokens}
        return {
            "greedy": False,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_new_tokens": self.max_new_tokens,
        }


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokenizer's EOS, any extra EOS ids the model's generation config lists, and the chat
    template's end-of-turn token (a chat-trained student ends its answer with it)."""
    ids = [tokenizer.eos_token_id]
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for tok in [*([extra] if isinstance(extra, int) else (extra or [])), *end_of_turn_ids(tokenizer)]:
        if tok not in ids:
            ids.append(tok)
    return ids


def prompt_budget(model: Any, max_new_tokens: int, max_prompt_length: int | None = None) -> int | None:
    """Most prompt tokens that leave room for ``max_new_tokens`` within the model's positions."""
    limit = getattr(model.config, "max_position_embeddings", None)
    budget = None if limit is None else limit - max_new_tokens
    if budget is not None and budget < 1:
        raise UserError(
            f"--max-new-tokens {max_new_tokens} leaves no room for a prompt: the model has {limit} positions"
        )
    if max_prompt_length is not None:
        budget = max_prompt_length if budget is None else min(budget, max_prompt_length)
    return budget


def encode_prompts(
    tokenizer: Any, prompts: Sequence[str], max_prompt_tokens: int | None
) -> tuple[list[list[int]], int]:
    """Token ids per prompt (as in training), keeping the last ``max_prompt_tokens``.

    Keeping the end keeps the "### Response:" cue the model answers after. Returns the ids and
    how many prompts were cut.
    """
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    if max_prompt_tokens is None:
        return encoded, 0
    cut = sum(len(ids) > max_prompt_tokens for ids in encoded)
    return [ids[-max_prompt_tokens:] for ids in encoded], cut


def cut_at_eos(ids: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """The tokens before the first stop token (all of them when none occurs)."""
    stops = set(stop_ids)
    for i, tok in enumerate(ids):
        if tok in stops:
            return list(ids[:i])
    return list(ids)


@dataclass
class Generation:
    """One pass over the prompts with one seed."""

    seed: int | None
    predictions: list[str]
    new_tokens: int  # tokens sampled, each response counted up to and including its EOS
    wall_s: float

    @property
    def examples_per_s(self) -> float:
        return len(self.predictions) / max(self.wall_s, 1e-9)

    @property
    def new_tokens_per_s(self) -> float:
        return self.new_tokens / max(self.wall_s, 1e-9)


@torch.inference_mode()
def generate(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    sampling: Sampling,
    seed: int | None,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
) -> Generation:
    """Decode a response for every prompt with ``model.generate``.

    Args:
        prompt_ids: token ids per prompt (see :func:`encode_prompts`).
        seed: seeds torch's global generator once before the first batch (ignored when greedy).
        on_batch: called with the number of examples finished after each batch (progress).

    Returns:
        The predictions in prompt order.
    """
    from transformers import GenerationConfig

    stop_ids = stop_token_ids(model, tokenizer)
    pad_id = pad_token_id(tokenizer)
    config = sampling.generation_config(stop_ids, pad_id)
    device = next(model.parameters()).device
    # Longest first: similar lengths share a batch (less padding), and a batch too big for memory fails early.
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    predictions = [""] * len(prompt_ids)
    new_tokens = 0
    # A checkpoint's generation_config.json (e.g. a repetition penalty or top-k 50) would fill in
    # every field we leave unset; blank it so only the protocol's settings apply.
    saved_config, model.generation_config = model.generation_config, GenerationConfig()
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    try:
        if seed is not None:
            torch.manual_seed(seed)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            input_ids, attention_mask = left_pad([prompt_ids[i] for i in rows], pad_id)
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
            )  # [b, T + new]
            for i, seq in zip(rows, out[:, input_ids.shape[1] :].tolist(), strict=True):
                kept = cut_at_eos(seq, stop_ids)
                new_tokens += min(len(kept) + 1, len(seq))
                predictions[i] = tokenizer.decode(kept, skip_special_tokens=True).strip()
            if on_batch is not None:
                on_batch(len(rows))
    finally:
        model.generation_config = saved_config
        model.train(was_training)
    return Generation(seed, predictions, new_tokens, time.perf_counter() - started)
