"""Held-out evaluation during training: token-weighted losses of a few probes on held-out batches."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from functools import partial
from typing import Any

import torch
from torch import nn

from kdtool import distributed
from kdtool.config import DistillConfig
from kdtool.context import StepContext
from kdtool.data import BatchLoader, TokenizedDataset
from kdtool.distributed import DistInfo
from kdtool.objective import Objective
from kdtool.registry import get_objective
from kdtool.run_dir import Run
from kdtool.steps import eval_micro_batch
from kdtool.trackers import Trackers
from kdtool.train_state import TrainState


def eval_probes(ctx: StepContext, objective: Objective[Any], cfg: DistillConfig) -> dict[str, Objective[Any]]:
    """What held-out evaluation measures: student cross-entropy on the references (always), forward
    and reverse KL to a live teacher, and the objective's own loss when it scores references."""
    probes: dict[str, Objective[Any]] = {"ce": get_objective("sft")}
    if ctx.teacher is not None:
        probes.update(fkl=get_objective("fkl"), rkl=get_objective("rkl"))
        if objective.scores_references:
            # The objective's loss *is* one of the probes (fkl at its defaults): the same object, so
            # the engine computes it once (``token_loss_sums``); the value is the same either way.
            same = (
                p for p in probes.values() if type(p) is type(objective) and p.options == objective.options
            )
            probes["loss"] = next(same, objective)
    elif ctx.teacher_cache is not None and not cfg.eval_data:
        probes["loss"] = objective  # the held-out split comes from --data, so the cache covers it
    return probes


@torch.no_grad()
def evaluate(
    ctx: StepContext,
    objective: Objective[Any],
    dataset: TokenizedDataset | None,
    cfg: DistillConfig,
    forward: nn.Module | None = None,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Held-out metrics ``eval_<probe>`` (see ``eval_probes``), token-weighted over the batches.

    Each batch costs one teacher and one student forward, shared by every probe. ``forward`` (a
    ``StepModule``, possibly FSDP-sharded) runs them; by default the plain student.
    ``max_batches`` (default ``cfg.eval_batches``, else all) bounds the batches read.
    """
    if dataset is None:
        return {}
    probes = eval_probes(ctx, objective, cfg)
    step = partial(eval_micro_batch, probes)
    ctx.student.eval()
    sums: dict[str, float] = defaultdict(float)
    tokens = 0
    loader = BatchLoader(dataset, cfg.batch_size, seed=0, shuffle=False)
    limit = min(max_batches or cfg.eval_batches or loader.batches_per_epoch(), loader.batches_per_epoch())
    for i, batch in enumerate(loader):
        if i >= limit:
            break
        loss_sums, n = step(ctx, batch) if forward is None else forward(batch, step)
        for name, loss_sum in loss_sums.items():
            sums[name] += float(loss_sum)
        tokens += int(n)
    return {f"eval_{k}": v / max(tokens, 1) for k, v in sums.items()}


def held_out_batches(cfg: DistillConfig, dataset: TokenizedDataset | None) -> int:
    """Batches of ``--batch-size`` in the held-out set (0 without one)."""
    return math.ceil(len(dataset) / cfg.batch_size) if dataset else 0


class HeldOut:
    """The run's periodic evaluation: ``log`` evaluates, writes the record (rank 0) and adds the time
    it took to ``state.eval_time``.

    ``forward``: the (sharded) step module when evaluation is a collective (every rank takes part
    and rank 0 logs); ``None`` when only rank 0 evaluates, with the other ranks at the barrier.
    """

    def __init__(self, ctx: StepContext, objective: Objective[Any], dataset: TokenizedDataset | None,
                 cfg: DistillConfig, forward: nn.Module | None, batches: int, info: DistInfo):  # fmt: skip
        self.ctx, self.objective, self.dataset, self.cfg = ctx, objective, dataset, cfg
        self.forward, self.batches, self.info = forward, batches, info

    def log(self, run: Run, trackers: Trackers, state: TrainState, started: float) -> None:
        began = time.perf_counter()
        main = self.info.is_main
        if self.forward is not None or main:
            metrics = evaluate(self.ctx, self.objective, self.dataset, self.cfg, self.forward, self.batches)
        if main:
            run.log({"step": state.step, **metrics}, trackers)
        distributed.barrier(self.info)
        state.eval_time += time.perf_counter() - began
        state.elapsed = time.perf_counter() - started
