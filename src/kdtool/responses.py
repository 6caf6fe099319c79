"""Where a token-level objective's responses come from: the data's references, the student's own
samples (on-policy distillation, GKD) or the teacher's samples (sequence-level KD), or a mix.

``ResponseStream`` is the token step's micro-batch stream when responses are sampled. For each data
batch it flips a seeded coin: with probability λ (``--on-policy-fraction``, GKD's lmbda) the student
answers the batch's prompts; otherwise the batch keeps its references (``--responses reference``)
or the teacher answers (``--responses teacher``). The objective then scores every position of the
response through the chunked engine exactly as it scores references (the student's logits on the
sampled tokens, the teacher's at the same positions); no gradient flows through the sampling.

The coin is seeded from the run's seed alone, so every rank makes the same choice (a sharded model
then runs the same forwards everywhere); its state and the data loader's are in ``state_dict``, and
the sampling generator is the trainer's to snapshot, so a resumed run draws the same samples.
"""

from __future__ import annotations

from typing import Any

import torch

from kdtool.context import StepContext
from kdtool.rollout import Buffer, answer, collate, prompts_of
from kdtool.rollout_spec import RolloutSettings
from kdtool.streams import Batch, LoaderStream

COIN_SEED = 104_729  # offsets the run's seed for the source coin (shared by all ranks)


class ResponseStream(LoaderStream):
    """Micro-batches of prompts with references, the student's samples or the teacher's samples."""

    def __init__(self, loader: Any, ctx: StepContext):
        super().__init__(loader)
        self.ctx, self.settings = ctx, ctx.settings
        self.coin = torch.Generator().manual_seed(ctx.settings.seed + COIN_SEED)

    def source(self) -> str:
        """The next micro-batch's source: ``student``, else ``--responses`` (one coin flip)."""
        share = self.settings.student_share
        if share >= 1:
            return "student"
        on_policy = share > 0 and float(torch.rand((), generator=self.coin)) < share
        return "student" if on_policy else self.settings.responses

    def __next__(self) -> Batch:
        batch = super().__next__()
        source = self.source()
        if source == "reference":
            return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        return self.answered(batch, source)

    def answered(self, batch: Batch, source: str) -> Batch:
        """``batch``'s prompts with responses sampled from ``source`` (student or teacher), in the
        trainer's layout: labels on the sampled tokens, up to and including the first stop token."""
        ctx, s = self.ctx, self.settings
        prompts = prompts_of(batch)
        model, call = (
            (ctx.student, ctx.student_call) if source == "student" else (ctx.teacher, ctx.teacher_call)
        )
        settings = RolloutSettings(
            s.max_new_tokens, len(prompts), len(prompts), temperature=s.temperature, top_p=s.top_p
        )
        buffer = Buffer()
        buffer.add(answer(ctx, prompts, settings, model, call), {}, {})
        out = collate(buffer, list(range(len(buffer))), ctx.pad_id)
        return {k: out[k] for k in ("input_ids", "attention_mask", "labels")}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "coin": self.coin.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.coin.set_state(state["coin"])
