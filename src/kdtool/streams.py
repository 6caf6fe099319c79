"""Micro-batch streams: what the trainer draws each step's micro-batches from, resumably.

A stream is an endless iterator whose position can be saved and restored exactly; the trainer
snapshots ``state_dict()`` at the start of every optimizer step, with every RNG.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from torch import Tensor

Batch = dict[str, Tensor]


class MicroBatchStream(Protocol):
    """An endless iterator of micro-batches whose position can be saved and restored exactly.

    The trainer snapshots ``state_dict()`` at the start of every optimizer step, with every RNG.
    """

    def __iter__(self) -> Iterator[Batch]: ...
    def __next__(self) -> Batch: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class LoaderStream:
    """The data loader's batches as they are, epoch after epoch (``BatchLoader`` restarts itself)."""

    def __init__(self, loader: Any):
        self.loader = loader
        self._batches: Iterator[Batch] | None = None

    def __iter__(self) -> LoaderStream:
        return self

    def __next__(self) -> Batch:
        if self._batches is None:
            self._batches = iter(self.loader)
        return next(self._batches)

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])
        self._batches = None
