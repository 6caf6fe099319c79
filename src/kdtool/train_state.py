"""Checkpoints of a run: what they hold besides the weights, the snapshot an interrupted step resumes
from, and the ``Checkpointer`` that saves and loads them.

The trainer takes a ``Snapshot`` at the start of every optimizer step: the micro-batch stream's
position (``state_dict``), every RNG (Python, NumPy, torch, CUDA) and the sampling generator. A
checkpoint stores the snapshot of the step about to run, so a run interrupted in the middle of a
step replays that whole step on resume, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdtool import checkpoint, distributed, lora
from kdtool.config import DistillConfig
from kdtool.distributed import DistInfo
from kdtool.errors import UserError


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    eval_time: float = 0.0  # seconds of `elapsed` spent in held-out evaluation
    history: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Snapshot:
    """One rank's resumable state at the start of an optimizer step."""

    stream: dict[str, Any]
    rng: dict[str, Any]
    generator: Any | None

    @classmethod
    def take(cls, stream: Any, generator: Any | None) -> Snapshot:
        return cls(stream.state_dict(), checkpoint.rng_state(), generator.get_state() if generator else None)

    def rank_state(self) -> dict[str, Any]:
        """What differs between ranks besides the RNGs: the stream (minillm: this rank's rollout
        buffer and its position in it) and the sampling generator (seeded per rank)."""
        out: dict[str, Any] = {"stream": self.stream}
        if self.generator is not None:
            out["generator"] = self.generator
        return out


def trainer_state(
    state: TrainState,
    rngs: list[dict[str, Any]],
    ranks: list[dict[str, Any]],
    optimizer_state: dict[str, Any],
    scheduler: Any,
) -> dict[str, Any]:
    """The checkpoint's trainer state: counters, optimizer and scheduler, and every rank's RNGs
    (``rng``) and ``Snapshot.rank_state`` (``ranks``), in rank order."""
    return {
        "step": state.step,
        "tokens": state.tokens,
        "elapsed": state.elapsed,
        "eval_time": state.eval_time,
        "rng": rngs,
        "ranks": ranks,
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
    }


def restore(
    saved: dict[str, Any],
    state: TrainState,
    stream: Any,
    scheduler: Any,
    generator: Any | None,
    info: DistInfo = DistInfo(),
) -> None:
    """Put this rank back where ``saved`` says: counters, scheduler, stream, RNGs, generator."""
    rngs, ranks = saved["rng"], saved.get("ranks")
    if len(rngs) != info.world:
        raise UserError(
            f"--resume: the checkpoint was written by {len(rngs)} process(es); relaunch with that many"
        )
    if not ranks or "stream" not in ranks[info.rank]:
        raise UserError("--resume: the checkpoint was written by an older kdtool (no stream state)")
    state.step, state.tokens, state.elapsed = saved["step"], saved["tokens"], saved["elapsed"]
    state.eval_time = saved.get("eval_time", 0.0)
    scheduler.load_state_dict(saved["scheduler"])
    mine = ranks[info.rank]
    stream.load_state_dict(mine["stream"])
    checkpoint.set_rng_state(rngs[info.rank])
    if generator is not None and "generator" in mine:
        generator.set_state(mine["generator"])


class Checkpointer:
    """Saves the student, optimizer, scheduler and every rank's snapshot (collectives on all ranks,
    files on rank 0)."""

    def __init__(self, directory: Path, cfg: DistillConfig, student: Any, optimizer: Any, scheduler: Any,
                 adapter: Any | None, info: DistInfo, sharded: bool, config_yaml: str):  # fmt: skip
        self.directory, self.cfg, self.config_yaml = directory, cfg, config_yaml
        self.student, self.optimizer, self.scheduler, self.adapter = student, optimizer, scheduler, adapter
        self.info, self.sharded = info, sharded

    def save(self, state: TrainState, snapshot: Snapshot) -> Path:
        rngs = distributed.gather_objects(snapshot.rng, self.info)
        ranks = distributed.gather_objects(snapshot.rank_state(), self.info)
        model_state = distributed.full_model_state(self.student, self.info, self.sharded)
        optim_state = distributed.full_optimizer_state(self.student, self.optimizer, self.sharded)
        where = self.directory / f"step-{state.step:06d}"
        if self.info.is_main:
            ts = trainer_state(state, rngs, ranks, optim_state, self.scheduler)
            saver = self.student if self.adapter is None else self.adapter  # LoRA: the adapter only
            where = checkpoint.save(
                self.directory,
                state.step,
                saver,
                ts,
                self.config_yaml,
                self.cfg.keep_checkpoints,
                model_state,
            )
        distributed.barrier(self.info)
        return where

    def load(self, state: TrainState, stream: Any, generator: Any | None) -> Path:
        last = checkpoint.latest(self.directory)
        assert last is not None
        saved = checkpoint.load_state(last)
        weights = checkpoint.load_student_state(last)
        if self.adapter is not None:
            lora.load_adapter_state(self.adapter, weights)
            self.optimizer.load_state_dict(saved["optimizer"])
        else:
            distributed.load_full_state(
                self.student, self.optimizer, weights, saved["optimizer"], self.sharded
            )
        restore(saved, state, stream, self.scheduler, generator, self.info)
        return last
