"""The rollout stream: prompt batches → the student's sampled responses → PPO-style micro-batches.

``RolloutStream`` is the micro-batch stream of on-policy steps (``kdtool.onpolicy``). It collects a
buffer of ``rollout_batch_size`` responses (``collect``: sampled with ``kdtool.sampling.sample``, no
grad, the student in eval mode), lets the objective turn each ``Rollout`` into per-token and
per-sequence tensors, plans ``inner_epochs`` shuffled passes over the buffer (``schedule``), and
serves them as micro-batches in the trainer's layout (``collate``), then collects a fresh buffer.
Its whole position (buffer, plan, cursor, shuffle generator, the prompt loader and an optional
auxiliary loader) is in ``state_dict``; the sampling generator is the trainer's to snapshot.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from kdtool.context import StepContext
from kdtool.errors import UserError
from kdtool.rollout_spec import RolloutSettings
from kdtool.sampling import Rollout, left_pad, sample
from kdtool.streams import Batch, LoaderStream
from kdtool.targets import IGNORE_INDEX

# Rollout → (per-token tensors {name: [B, T]}, per-sequence tensors {name: [B]}).
RolloutTensors = Callable[[Rollout], tuple[dict[str, Tensor], dict[str, Tensor]]]


@dataclass
class Buffer:
    """Rollouts of one collection round, one entry per response, all on the CPU.

    ``prompts[i]`` / ``responses[i]`` are 1-D token ids; ``tokens[k][i]`` is the per-token
    quantity k ``[len(responses[i])]``; ``sequences[k][i]`` a per-sequence scalar.
    """

    prompts: list[Tensor] = field(default_factory=list)
    responses: list[Tensor] = field(default_factory=list)
    tokens: dict[str, list[Tensor]] = field(default_factory=dict)
    sequences: dict[str, list[Tensor]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.responses)

    def add(self, rollout: Rollout, per_token: dict[str, Tensor], per_sequence: dict[str, Tensor]) -> None:
        """Append a rollout's valid responses with their ``[B, T]`` / ``[B]`` tensors."""
        mask = rollout.response_mask
        lengths = mask.sum(1).tolist()
        self.prompts += [
            ids[keep].cpu() for ids, keep in zip(rollout.prompt_ids, rollout.prompt_mask.bool(), strict=True)
        ]
        self.responses += list(rollout.response_ids[mask].cpu().split(lengths))
        for k, v in per_token.items():  # flatten the valid tokens row-major, then cut per response
            self.tokens.setdefault(k, []).extend(v[mask].float().cpu().split(lengths))
        for k, v in per_sequence.items():
            self.sequences.setdefault(k, []).extend(v.float().cpu().unbind())

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` responses."""
        self.prompts, self.responses = self.prompts[:n], self.responses[:n]
        self.tokens = {k: v[:n] for k, v in self.tokens.items()}
        self.sequences = {k: v[:n] for k, v in self.sequences.items()}

    def state(self) -> dict[str, Any]:
        """A snapshot (new lists; the tensors are never modified in place)."""
        return {
            "prompts": list(self.prompts),
            "responses": list(self.responses),
            "tokens": {k: list(v) for k, v in self.tokens.items()},
            "sequences": {k: list(v) for k, v in self.sequences.items()},
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Buffer:
        return cls(**Buffer(**state).state())


def prompts_of(batch: Batch) -> list[Tensor]:
    """The prompt of each row of a training batch: its tokens before the last run of targets (the
    last response; in a multi-turn chat the earlier turns, answers included, are the context)."""
    out = []
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
        target = (labels != IGNORE_INDEX) & mask.bool()
        starts = (target[1:] & ~target[:-1]).nonzero().flatten() + 1  # where a run of targets begins
        first = int(starts[-1]) if len(starts) else (0 if bool(target[:1].any()) else int(mask.sum()))
        out.append(ids[:first])
    return out


def collate(buffer: Buffer, rows: list[int], pad_id: int) -> Batch:
    """A micro-batch in the trainer's layout: right-padded prompt + response, labels on the
    response (so ``labels[:, 1:] != -100`` selects the sampled tokens in row-major order), the
    buffer's per-token tensors flattened in that same order as ``tok_<name>`` ``[N]``, its
    per-sequence ones as ``seq_<name>`` ``[b]``, and ``seq_len`` (response lengths)."""
    prompts, responses = [buffer.prompts[i] for i in rows], [buffer.responses[i] for i in rows]
    seqs = [torch.cat([p, r]) for p, r in zip(prompts, responses, strict=True)]
    targets = [
        torch.cat([torch.full_like(p, IGNORE_INDEX), r]) for p, r in zip(prompts, responses, strict=True)
    ]
    out = {
        "input_ids": pad_sequence(seqs, batch_first=True, padding_value=pad_id),
        "attention_mask": pad_sequence([torch.ones_like(s) for s in seqs], batch_first=True),
        "labels": pad_sequence(targets, batch_first=True, padding_value=IGNORE_INDEX),
    }
    for k, v in buffer.tokens.items():
        out[f"tok_{k}"] = torch.cat([v[i] for i in rows])
    for k, v in buffer.sequences.items():
        out[f"seq_{k}"] = torch.stack([v[i] for i in rows])
    out["seq_len"] = torch.tensor([r.numel() for r in responses], dtype=torch.float32)
    return out


def schedule(n: int, batch_size: int, epochs: int, shuffle: torch.Generator) -> list[list[int]]:
    """Row indices of every micro-batch: ``epochs`` shuffled passes over ``n`` rollouts."""
    out = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=shuffle).tolist()
        out += [order[i : i + batch_size] for i in range(0, n, batch_size)]
    return out


def answer(
    ctx: StepContext,
    prompts: list[Tensor],
    settings: RolloutSettings,
    model: Any,
    call: Any | None = None,
    teacher: Any | None = None,
) -> Rollout:
    """``model``'s sampled answers to ``prompts`` (no grad, the student in eval mode meanwhile;
    ``teacher``: also score them, and mix it into the proposal by ``settings.alpha``), within
    ``max_length``, stopping at EOS or the chat template's end of turn. ``call`` runs ``model`` under
    FSDP2; ranks agree on the loop bounds.

    Raises:
        UserError: an example without a prompt (there is nothing to answer).
    """
    if any(len(p) == 0 for p in prompts):
        raise UserError("a response is sampled for each example's prompt: every example needs a prompt")
    ids, mask = left_pad(prompts, ctx.pad_id)
    was_training = ctx.student.training
    ctx.student.eval()
    try:
        with ctx.autocast():
            return sample(
                model,
                ids.to(ctx.device),
                mask.to(ctx.device),
                eos_token_id=ctx.tokenizer.eos_token_id,
                pad_token_id=ctx.pad_id,
                max_new_tokens=max(1, min(settings.max_new_tokens, ctx.settings.max_length - ids.shape[1])),
                teacher=teacher,
                alpha=settings.alpha,
                temperature=settings.temperature,
                top_k=settings.top_k,
                top_p=settings.top_p,
                generator=ctx.generator,
                vocab_size=ctx.vocab_size,
                any_rank=ctx.rank_sync.any if ctx.rank_sync else None,
                stop_token_ids=ctx.stop_token_ids,
                student_call=call,
                teacher_call=ctx.teacher_call if teacher is not None else None,
            )
    finally:
        ctx.student.train(was_training)


def collect(
    prompt_batches: Iterator[Batch], ctx: StepContext, settings: RolloutSettings, tensors: RolloutTensors
) -> Buffer:
    """Sample ``rollout_batch_size`` responses to the next prompt batches (no grad, student in eval mode).

    Under FSDP2 every model call goes through the module the wrapper owns (``ctx.student_call``,
    ``ctx.teacher_call``) and the loops agree on their bounds over ranks (``ctx.rank_sync``), so
    that all ranks make the same forward passes; without sharding each rank stops on its own.
    """
    sync = ctx.rank_sync
    want = settings.rollout_batch_size
    buffer = Buffer()
    while sync.any(len(buffer) < want) if sync else len(buffer) < want:
        prompts = prompts_of(next(prompt_batches))
        rollout = answer(ctx, prompts, settings, ctx.student, ctx.student_call, ctx.teacher)
        buffer.add(rollout, *tensors(rollout))
    if sync:  # a short last data batch can leave ranks with more rollouts: equal plans
        buffer.truncate(sync.min(len(buffer)))
    return buffer


class RolloutStream:
    """Endless micro-batches of rollouts (see the module docstring), resumable at any micro-batch.

    Args:
        prompts: the prompt loader (a ``BatchLoader`` over the training data).
        ctx: the step context (models, tokenizer, sampling generator, rank).
        settings: sampling and serving settings.
        tensors: the objective's per-token / per-sequence tensors of a rollout.
        finish: called on each full buffer's per-token tensors before it is served (e.g. whitening).
        aux: an optional second loader whose next batch rides along with every micro-batch, its
            keys prefixed ``aux_`` (minillm's language-modelling batches).
    """

    def __init__(
        self,
        prompts: Any,
        ctx: StepContext,
        settings: RolloutSettings,
        tensors: RolloutTensors,
        finish: Callable[[dict[str, list[Tensor]]], None] | None = None,
        aux: Any | None = None,
    ):
        self.ctx, self.settings, self.tensors, self.finish = ctx, settings, tensors, finish
        # The loaders' batches, epoch after epoch (the saved state keeps the loaders' own layout).
        self.prompts = LoaderStream(prompts)
        self.aux = LoaderStream(aux) if aux is not None else None
        self.shuffle = torch.Generator().manual_seed(ctx.settings.seed + 7919 * (1 + ctx.dist.rank))
        self.buffer, self.plan, self.cursor = Buffer(), [], 0

    def __iter__(self) -> RolloutStream:
        return self

    def __next__(self) -> Batch:
        if self.cursor >= len(self.plan):
            self.buffer = collect(self.prompts, self.ctx, self.settings, self.tensors)
            if self.finish is not None:
                self.finish(self.buffer.tokens)
            size = self.settings.mini_batch_size
            self.plan, self.cursor = (
                schedule(len(self.buffer), size, self.settings.inner_epochs, self.shuffle),
                0,
            )
        batch = collate(self.buffer, self.plan[self.cursor], self.ctx.pad_id)
        if self.aux is not None:
            batch.update({f"aux_{k}": v for k, v in next(self.aux).items()})
        self.cursor += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "loader": self.prompts.state_dict()["loader"],
            "buffer": self.buffer.state(),
            "plan": [list(rows) for rows in self.plan],
            "cursor": self.cursor,
            "shuffle": self.shuffle.get_state(),
            "aux": self.aux.state_dict()["loader"] if self.aux is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prompts.load_state_dict({"loader": state["loader"]})
        self.buffer = Buffer.from_state(state["buffer"])
        self.plan, self.cursor = [list(rows) for rows in state["plan"]], int(state["cursor"])
        self.shuffle.set_state(state["shuffle"])
        if self.aux is not None and state.get("aux") is not None:
            self.aux.load_state_dict({"loader": state["aux"]})
