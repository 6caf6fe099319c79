"""Experiment trackers (``--report-to tensorboard,wandb,trackio``): every ``metrics.jsonl`` record
also goes to each tracker, with the optimizer step as the x-axis and the resolved config as the
run's config. Each tracker is an optional dependency, imported only when asked for; only rank 0
opens any.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from kdtool.errors import UserError

# name -> the module it needs; kdtool's pip extra of the same name installs it
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


class Tracker(Protocol):
    def log(self, scalars: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def parse_report_to(value: str | Sequence[str] | None) -> list[str]:
    """``"tensorboard,wandb"`` (or a list) -> ``["tensorboard", "wandb"]``; ``none`` / empty -> ``[]``.

    Raises:
        ValueError: an unknown tracker name (the list of known ones is in the message).
    """
    items = value.split(",") if isinstance(value, str) else list(value or [])
    names = [n.strip().lower() for n in items if n.strip()]
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(f"unknown tracker {unknown[0]!r} (choose from {', '.join(TRACKERS)} or none)")
    return list(dict.fromkeys(names))  # keep order, drop repeats


def require_installed(names: Sequence[str]) -> None:
    """Refuse, in one line, a tracker whose package is not installed (checked without importing it).

    Raises:
        UserError: naming the package and the pip extra that installs it.
    """
    for name in names:
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise UserError(
                f"--report-to {name} needs the {TRACKERS[name]} package: pip install 'kdtool[{name}]'"
            )


def scalars_of(record: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a ``metrics.jsonl`` record, without ``step`` (the x-axis)."""
    return {
        k: float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
    }


class TensorBoard:
    """Event files in ``<run>/tensorboard``; the config as a text summary named ``config``."""

    def __init__(self, root: Path, config: dict[str, Any], config_yaml: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(root / "tensorboard"))
        self.writer.add_text("config", "```\n" + config_yaml + "```", global_step=0)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, global_step=step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A W&B run in ``<run>/wandb``: project ``$WANDB_PROJECT`` (default ``kdtool``), named after
    the run directory. ``WANDB_MODE=offline`` works without network, as usual."""

    def __init__(self, root: Path, config: dict[str, Any], config_yaml: str):
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "kdtool"), name=root.name, dir=str(root), config=config
        )

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackio:
    """A trackio run (local SQLite by default): project ``$TRACKIO_PROJECT`` (default ``kdtool``)."""

    def __init__(self, root: Path, config: dict[str, Any], config_yaml: str):
        import trackio

        self.trackio = trackio
        trackio.init(project=os.environ.get("TRACKIO_PROJECT", "kdtool"), name=root.name, config=config)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.trackio.log(scalars, step=step)

    def close(self) -> None:
        self.trackio.finish()


FACTORIES: dict[str, Callable[[Path, dict[str, Any], str], Tracker]] = {
    "tensorboard": TensorBoard,
    "wandb": WandB,
    "trackio": Trackio,
}


class Trackers:
    """All the trackers of a run behind one ``log(record)``; empty (a no-op) on ranks other than 0."""

    def __init__(self, trackers: list[Tracker] | None = None):
        self.trackers = trackers or []

    @classmethod
    def open(cls, names: Sequence[str], root: Path, config: dict[str, Any], config_yaml: str) -> Trackers:
        """Start each named tracker for the run in ``root``; one that fails (no login, no network)
        is a ``UserError`` in the tracker's own words, and the ones already started are closed."""
        opened = cls()
        for name in names:
            try:
                opened.trackers.append(FACTORIES[name](root, config, config_yaml))
            except Exception as exc:
                opened.close()
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise UserError(f"--report-to {name}: the tracker did not start: {reason}") from exc
        return opened

    def log(self, record: dict[str, Any]) -> None:
        """Forward one ``metrics.jsonl`` record; records without a step (the start event) are skipped."""
        if not self.trackers or "step" not in record:
            return
        scalars = scalars_of(record)
        for tracker in self.trackers:
            tracker.log(scalars, int(record["step"]))

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
