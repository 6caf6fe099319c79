"""The rollout step: an objective that learns from the student's own samples (``needs_rollouts``).

Its micro-batch stream is a ``RolloutStream`` over the prompts of the training data; each
micro-batch's loss is the objective's per-token loss at the sampled tokens, computed by the chunked
engine with the rollout's per-token tensors (``tok_*``) as extra statistics, plus an optional
language-modelling term on a second loader. The objective supplies the math through four methods:

* ``rollout_settings(settings) -> RolloutSettings``: how to sample and serve;
* ``rollout_tensors(rollout) -> (per_token, per_sequence)``: what each sampled token carries;
* ``finish_buffer(buffer)``: buffer-wide processing (e.g. whitening the advantages);
* ``micro_batch_count(n_tokens, n_sequences)``: what the step's loss sum is divided by;

and, optionally, ``lm_term() -> LMTerm | None``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kdtool.context import StepContext
from kdtool.data import BatchLoader, TokenizedDataset
from kdtool.lm_corpus import load_lm_examples
from kdtool.objective import Metrics
from kdtool.rollout import RolloutStream
from kdtool.rollout_spec import LMTerm
from kdtool.steps import Batch, to_device, token_loss


class RolloutStep:
    """An on-policy objective on rollouts of the student (see the module docstring)."""

    def __init__(self, objective: Any):
        self.objective = objective
        self.lm: LMTerm | None = objective.lm_term() if hasattr(objective, "lm_term") else None

    def stream(self, loader: Any, ctx: StepContext) -> RolloutStream:
        if ctx.teacher is None:
            raise ValueError(
                f"{self.objective.name} needs a live teacher (a sparse cache cannot score samples)"
            )
        return RolloutStream(
            loader,
            ctx,
            self.objective.rollout_settings(ctx.settings),
            self.objective.rollout_tensors,
            self.objective.finish_buffer,
            aux=self._lm_loader(ctx) if self.lm is not None else None,
        )

    def loss(self, ctx: StepContext, batch: Batch) -> tuple[Tensor, Tensor, Metrics]:
        """``(loss_sum, count, metrics)`` of one micro-batch of rollouts (+ its LM batch)."""
        batch = to_device(batch, ctx.device)
        seqs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        stats = {k[4:]: v.float() for k, v in batch.items() if k.startswith("tok_")}
        loss_sum, n_tokens, metrics = token_loss(self.objective, ctx, seqs, stats)
        n_seq = torch.tensor(float(batch["seq_len"].numel()), device=ctx.device)
        count = self.objective.micro_batch_count(n_tokens, n_seq)
        for k, v in batch.items():
            if k.startswith("seq_") and k != "seq_len":
                metrics[k[4:]] = (v.sum(), n_seq)
        metrics["response_length"] = (batch["seq_len"].sum(), n_seq)
        if self.lm is not None and "aux_input_ids" in batch:
            lm_batch = {k[4:]: v for k, v in batch.items() if k.startswith("aux_")}
            lm_sum, lm_n, _ = token_loss(self.lm.objective, ctx, lm_batch)
            lm_n = lm_n.to(lm_sum.device).float()
            # L_PT is a mean over its own tokens (official), weighted against the rollout count.
            loss_sum = loss_sum + self.lm.weight * lm_sum / lm_n.clamp(min=1) * count
            metrics["lm_loss"] = (lm_sum.detach(), lm_n)
        return loss_sum, count, metrics

    def _lm_loader(self, ctx: StepContext) -> BatchLoader:
        assert self.lm is not None
        s = ctx.settings
        if self.lm.data:
            dataset = TokenizedDataset(
                load_lm_examples(self.lm.data), ctx.tokenizer, s.max_length, s.max_prompt_length
            )
        elif ctx.train_dataset is not None:
            dataset = ctx.train_dataset
        else:
            raise ValueError(f"{self.objective.name}'s LM loss needs lm_data or the trainer's training set")
        size = self.lm.batch_size or s.batch_size
        return BatchLoader(dataset, size, s.seed + 1, rank=ctx.dist.rank, world=ctx.dist.world)
