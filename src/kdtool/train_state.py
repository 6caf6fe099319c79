"""What a checkpoint holds besides the weights, and the snapshot an interrupted step resumes from.

The trainer takes a ``Snapshot`` at the start of every optimizer step: the micro-batch stream's
position (``state_dict``), every RNG (Python, NumPy, torch, CUDA) and the sampling generator. A
checkpoint stores the snapshot of the step about to run, so a run interrupted in the middle of a
step replays that whole step on resume, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kdtool import checkpoint
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
