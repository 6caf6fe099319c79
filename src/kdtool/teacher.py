"""What the student learns from: the teacher's signal for a set of target positions.

A ``TeacherSignal`` is one of four variants:

* ``DenseSignal``: full-vocabulary logits ``[N, V]``;
* ``SparseSignal``: the teacher's top-k logits per token, ``values``/``indices`` ``[N, k]``, as read
  from a ``kdtool cache-logits`` cache (optionally with the full log-partition per row);
* ``LazySignal``: the teacher's final hidden states ``[N, H]`` and its output layer; ``rows()``
  builds dense logits for the rows asked for only, so full logits never exist for all N at once;
* ``NoSignal``: no teacher (``sft``).

Objectives receive a materialised signal (dense or sparse) for the rows they are asked to score and
read it through ``dense_log_probs`` / ``scores``; the engine decides how many rows exist at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from kdtool.divergence import log_softmax, upcast

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    from kdtool.lazy import torch


class TeacherSignal:
    """Teacher information for ``N`` target positions (see the variants below).

    ``TeacherSignal.dense / sparse / lazy / none`` build the variants.
    """

    is_sparse: ClassVar[bool] = False
    is_empty: ClassVar[bool] = False

    @staticmethod
    def dense(logits: Tensor) -> DenseSignal:
        return DenseSignal(logits)

    @staticmethod
    def sparse(
        values: Tensor, indices: Tensor, vocab_size: int, log_normalizer: Tensor | None = None
    ) -> SparseSignal:
        return SparseSignal(values, indices, vocab_size, log_normalizer)

    @staticmethod
    def lazy(hidden: Tensor, head: Callable[[Tensor], Tensor], vocab_size: int) -> LazySignal:
        return LazySignal(hidden, head, vocab_size)

    @staticmethod
    def none() -> NoSignal:
        return NoSignal()

    def __len__(self) -> int:
        raise NotImplementedError

    def rows(self, index: Tensor | slice) -> TeacherSignal:
        """The signal restricted to some rows (a boolean mask, index tensor or slice)."""
        raise NotImplementedError

    def flatten(self) -> TeacherSignal:
        """Collapse leading dims: ``[B, T, *] -> [B*T, *]``."""
        raise NotImplementedError

    def dense_log_probs(self, temperature: float = 1.0) -> Tensor:
        """Full-vocabulary teacher log-probabilities at temperature τ, fp32 (or fp64), ``[N, V]``."""
        raise ValueError("this objective needs a teacher, but no teacher signal was given")

    def scores(self, temperature: float = 1.0) -> Tensor:
        """Teacher logits / τ up to a constant per row, ``[N, V]``: the same softmax as
        ``dense_log_probs`` without normalising (dense: the logits themselves)."""
        return self.dense_log_probs(temperature)


@dataclass
class DenseSignal(TeacherSignal):
    """Dense teacher logits ``[N, V]`` (any float dtype; upcast where used)."""

    logits: Tensor
    # Without autograd (evaluation) several probes read the same rows: their log-probabilities are
    # computed once per temperature. Callers never modify them in place.
    _log_probs: dict[float, Tensor] = field(default_factory=dict, repr=False, compare=False)

    @property
    def vocab_size(self) -> int:
        return self.logits.shape[-1]

    def __len__(self) -> int:
        return self.logits.shape[0]

    def rows(self, index: Tensor | slice) -> DenseSignal:
        return DenseSignal(self.logits[index])

    def flatten(self) -> DenseSignal:
        return DenseSignal(self.logits.reshape(-1, self.logits.shape[-1]))

    def dense_log_probs(self, temperature: float = 1.0) -> Tensor:
        if torch.is_grad_enabled():
            return log_softmax(self.logits, temperature)
        if temperature not in self._log_probs:
            self._log_probs[temperature] = log_softmax(self.logits, temperature)
        return self._log_probs[temperature]

    def scores(self, temperature: float = 1.0) -> Tensor:
        return upcast(self.logits) / temperature


@dataclass
class SparseSignal(TeacherSignal):
    """The teacher's top-k logits per row.

    Attributes:
        values: ``[N, k]`` logits (sorted or not).
        indices: ``[N, k]`` their vocabulary ids.
        vocab_size: the vocabulary the indices refer to.
        log_normalizer: optional ``[N]``: the teacher's full-vocabulary ``logsumexp(z)``, so that
            ``values − log_normalizer`` are true log-probabilities (the missing-mass bucket needs
            it; ``None`` = unknown).
    """

    values: Tensor
    indices: Tensor
    vocab_size: int
    log_normalizer: Tensor | None = None

    is_sparse: ClassVar[bool] = True

    def __len__(self) -> int:
        return self.values.shape[0]

    def rows(self, index: Tensor | slice) -> SparseSignal:
        lse = self.log_normalizer[index] if self.log_normalizer is not None else None
        return SparseSignal(self.values[index], self.indices[index], self.vocab_size, lse)

    def flatten(self) -> SparseSignal:
        k = self.values.shape[-1]
        lse = None if self.log_normalizer is None else self.log_normalizer.reshape(-1)
        return SparseSignal(self.values.reshape(-1, k), self.indices.reshape(-1, k), self.vocab_size, lse)

    def dense_log_probs(self, temperature: float = 1.0) -> Tensor:
        """A distribution on the top-k support, renormalised (``-inf`` elsewhere)."""
        sparse = torch.log_softmax(upcast(self.values) / temperature, dim=-1)
        out = sparse.new_full((sparse.shape[0], self.vocab_size), float("-inf"))
        return out.scatter(-1, self.indices.long(), sparse)


@dataclass
class LazySignal(TeacherSignal):
    """Teacher final hidden states ``[N, H]`` and its output layer ``[n, H] -> [n, V']``; the
    logits of some rows are built when those rows are asked for (``rows``)."""

    hidden: Tensor
    head: Callable[[Tensor], Tensor]
    vocab_size: int

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def rows(self, index: Tensor | slice) -> DenseSignal:
        """Dense logits for these rows only (the lazy signal is materialised here)."""
        with torch.no_grad():
            return DenseSignal(self.head(self.hidden[index])[..., : self.vocab_size])

    def flatten(self) -> LazySignal:
        return LazySignal(self.hidden.reshape(-1, self.hidden.shape[-1]), self.head, self.vocab_size)

    def dense_log_probs(self, temperature: float = 1.0) -> Tensor:
        return self.rows(slice(None)).dense_log_probs(temperature)

    def scores(self, temperature: float = 1.0) -> Tensor:
        return self.rows(slice(None)).scores(temperature)


@dataclass
class NoSignal(TeacherSignal):
    """No teacher: objectives that need one raise when they read it."""

    is_empty: ClassVar[bool] = True

    def __len__(self) -> int:
        return 0

    def rows(self, index: Tensor | slice) -> NoSignal:
        return self

    def flatten(self) -> NoSignal:
        return self


def as_signal(teacher: TeacherSignal | Tensor | None) -> TeacherSignal:
    """Accept plain tensors (dense logits) wherever a TeacherSignal is expected."""
    if teacher is None:
        return NoSignal()
    if isinstance(teacher, TeacherSignal):
        return teacher
    return DenseSignal(teacher)
