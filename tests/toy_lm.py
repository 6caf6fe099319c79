"""A causal LM small enough to enumerate: the next-token logits are a free parameter per prefix.

``TableLM`` speaks the interfaces kdtool uses on real models: ``model(input_ids, attention_mask,
position_ids, past_key_values, use_cache)`` with ``.logits`` / ``.past_key_values`` (rollouts),
``model.base_model(...).last_hidden_state`` and ``get_output_embeddings()`` (the training
forward: the hidden state is the one-hot code of the prefix, the head is the logit table).
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

EOS = 0  # also the pad token, as in GPT-2


class PrefixCode(nn.Module):
    """``[B, L]`` token ids -> ``[B, L, rows]`` one-hot code of each position's prefix."""

    def __init__(self, vocab: int, max_len: int):
        super().__init__()
        self.vocab, self.max_len = vocab, max_len
        self.offsets = [0]
        for n in range(1, max_len + 1):
            self.offsets.append(self.offsets[-1] + vocab**n)
        self.rows = self.offsets[-1]

    def index(self, ids: Tensor) -> Tensor:
        if ids.shape[1] > self.max_len:
            raise ValueError(f"TableLM context is {self.max_len} tokens, got {ids.shape[1]}")
        code = torch.zeros_like(ids[:, 0])
        out = []
        for j in range(ids.shape[1]):
            code = code * self.vocab + ids[:, j]
            out.append(self.offsets[j] + code)
        return torch.stack(out, 1)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, **_: object
    ) -> SimpleNamespace:
        hidden = nn.functional.one_hot(self.index(input_ids), self.rows).float()
        return SimpleNamespace(last_hidden_state=hidden)


class TableLM(nn.Module):
    def __init__(self, vocab: int = 4, max_len: int = 4, scale: float = 1.0, seed: int = 0):
        super().__init__()
        self.code = PrefixCode(vocab, max_len)
        self.head = nn.Linear(self.code.rows, vocab, bias=False)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(vocab, self.code.rows, generator=g) * scale)
        self.config = SimpleNamespace()

    @property
    def base_model(self) -> PrefixCode:
        return self.code

    def get_output_embeddings(self) -> nn.Linear:
        return self.head

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: Tensor | None = None,
        use_cache: bool = False,
    ) -> SimpleNamespace:
        # The "KV cache" is the token history: the prefix code needs the whole prefix.
        full = input_ids if past_key_values is None else torch.cat([past_key_values, input_ids], 1)
        hidden = self.code(full).last_hidden_state[:, -input_ids.shape[1] :]
        return SimpleNamespace(logits=self.head(hidden), past_key_values=full if use_cache else None)


def all_responses(vocab: int, max_new: int) -> list[tuple[int, ...]]:
    """Every complete response: non-EOS tokens then EOS, or ``max_new`` non-EOS tokens."""
    out = []
    words = range(1, vocab)
    for n in range(max_new):
        out += [(*w, EOS) for w in itertools.product(words, repeat=n)]
    out += list(itertools.product(words, repeat=max_new))
    return out


def response_batch(prompt: list[int], responses: list[tuple[int, ...]]) -> tuple[Tensor, Tensor]:
    """``ids [S, P + T]`` (prompt, then each response, EOS-padded) and the response mask ``[S, T]``."""
    width = max(len(r) for r in responses)
    ids = torch.full((len(responses), len(prompt) + width), EOS, dtype=torch.long)
    mask = torch.zeros(len(responses), width)
    for i, r in enumerate(responses):
        ids[i, : len(prompt)] = torch.tensor(prompt)
        ids[i, len(prompt) : len(prompt) + len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def sequence_logprobs(model: nn.Module, prompt: list[int], responses: list[tuple[int, ...]]) -> Tensor:
    """``[S]`` log model(y | prompt) for each response (differentiable)."""
    ids, mask = response_batch(prompt, responses)
    logits = model(ids).logits[:, len(prompt) - 1 : -1]  # predicts each response token
    lp = torch.log_softmax(logits, -1).gather(-1, ids[:, len(prompt) :, None]).squeeze(-1)
    return (lp * mask).sum(1)


def exact_reverse_kl(student: nn.Module, teacher: nn.Module, prompt: list[int], max_new: int) -> Tensor:
    """KL[q(y|x) ‖ p(y|x)] summed over every complete response (differentiable in the student)."""
    responses = all_responses(student.head.out_features, max_new)
    lq = sequence_logprobs(student, prompt, responses)
    with torch.no_grad():
        lp = sequence_logprobs(teacher, prompt, responses)
    return (lq.exp() * (lq - lp)).sum()


def toy_context(student: TableLM, teacher: TableLM, seed: int = 0) -> Any:
    """A ``StepContext`` for the pair on the CPU (EOS = pad), sampling seeded by ``seed``."""
    from kdtool.context import StepContext

    return StepContext(
        student=student,
        teacher=teacher,
        teacher_cache=None,
        tokenizer=SimpleNamespace(pad_token_id=EOS, eos_token_id=EOS),
        vocab_size=student.head.out_features,
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(seed),
    )


def prompt_batch(prompt: list[int], b: int) -> dict[str, Tensor]:
    """``b`` copies of ``prompt`` as a training batch without targets (labels all -100)."""
    ids = torch.tensor([prompt] * b)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.full_like(ids, -100)}
