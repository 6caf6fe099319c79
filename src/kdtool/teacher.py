"""What the student learns from: the teacher's signal for a set of target positions.

A ``TeacherSignal`` is either *dense* (full-vocabulary logits, ``[N, V]``) or *sparse*
(the teacher's top-k logits per token, ``values``/``indices`` of shape ``[N, k]``, as read
from a ``kdtool cache-logits`` cache). Objectives receive a materialised signal for the rows
they are asked to score; the engine decides how many rows exist at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kdtool.divergence import upcast

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    from kdtool.lazy import torch


@dataclass
class TeacherSignal:
    """Teacher information for ``N`` target positions.

    Attributes:
        logits: dense teacher logits ``[N, V]`` (or ``None`` when sparse / absent).
        values: sparse top-k logits ``[N, k]``.
        indices: vocabulary ids of ``values`` ``[N, k]``.
        vocab_size: size of the vocabulary the indices refer to (needed for sparse signals).
        hidden: lazy dense signal: teacher final hidden states ``[N, H]``; ``rows()`` turns
            the selected rows into logits with ``head`` (so full logits never exist for all N).
        head: ``[n, H] -> [n, V]`` output layer for ``hidden``.
        log_normalizer: optional, sparse only: the teacher's full-vocabulary log-partition
            ``logsumexp(z)`` per row ``[N]``, so ``values − log_normalizer`` are true
            log-probabilities (needed for the missing-mass bucket; absent = unknown).
    """

    logits: Tensor | None = None
    values: Tensor | None = None
    indices: Tensor | None = None
    vocab_size: int | None = None
    hidden: Tensor | None = None
    head: Callable[[Tensor], Tensor] | None = None
    log_normalizer: Tensor | None = None

    @classmethod
    def dense(cls, logits: Tensor) -> TeacherSignal:
        return cls(logits=logits, vocab_size=logits.shape[-1])

    @classmethod
    def sparse(
        cls, values: Tensor, indices: Tensor, vocab_size: int, log_normalizer: Tensor | None = None
    ) -> TeacherSignal:
        return cls(values=values, indices=indices, vocab_size=vocab_size, log_normalizer=log_normalizer)

    @classmethod
    def lazy(cls, hidden: Tensor, head: Callable[[Tensor], Tensor], vocab_size: int) -> TeacherSignal:
        return cls(hidden=hidden, head=head, vocab_size=vocab_size)

    @classmethod
    def none(cls) -> TeacherSignal:
        return cls()

    @property
    def is_sparse(self) -> bool:
        return self.values is not None

    @property
    def is_empty(self) -> bool:
        return self.logits is None and self.values is None and self.hidden is None

    def __len__(self) -> int:
        for t in (self.logits, self.values, self.hidden):
            if t is not None:
                return t.shape[0]
        return 0

    def rows(self, index: Tensor | slice) -> TeacherSignal:
        """The signal restricted to some rows (a boolean mask, index tensor or slice).

        A lazy signal is materialised here: the result holds dense logits for those rows only.
        """
        if self.hidden is not None and self.head is not None:
            with torch.no_grad():
                logits = self.head(self.hidden[index])[..., : self.vocab_size]
            return TeacherSignal(logits=logits, vocab_size=self.vocab_size)
        if self.logits is not None:
            return TeacherSignal(logits=self.logits[index], vocab_size=self.vocab_size)
        if self.values is not None and self.indices is not None:
            lse = self.log_normalizer[index] if self.log_normalizer is not None else None
            return TeacherSignal(
                values=self.values[index],
                indices=self.indices[index],
                vocab_size=self.vocab_size,
                log_normalizer=lse,
            )
        return TeacherSignal()

    def flatten(self) -> TeacherSignal:
        """Collapse leading dims: ``[B, T, *] -> [B*T, *]``."""
        if self.hidden is not None:
            h = self.hidden.reshape(-1, self.hidden.shape[-1])
            return TeacherSignal(hidden=h, head=self.head, vocab_size=self.vocab_size)
        if self.logits is not None:
            return TeacherSignal(
                logits=self.logits.reshape(-1, self.logits.shape[-1]), vocab_size=self.vocab_size
            )
        if self.values is not None and self.indices is not None:
            k = self.values.shape[-1]
            return TeacherSignal(
                values=self.values.reshape(-1, k),
                indices=self.indices.reshape(-1, k),
                vocab_size=self.vocab_size,
                log_normalizer=None if self.log_normalizer is None else self.log_normalizer.reshape(-1),
            )
        return self

    def truncate_vocab(self, vocab: int) -> TeacherSignal:
        """Keep the first ``vocab`` logits (embedding matrices padded past ``len(tokenizer)``)."""
        if self.logits is not None and self.logits.shape[-1] != vocab:
            return TeacherSignal(logits=self.logits[..., :vocab], vocab_size=vocab)
        if self.hidden is not None:
            return TeacherSignal(hidden=self.hidden, head=self.head, vocab_size=vocab)
        return self

    def dense_log_probs(self, temperature: float = 1.0) -> Tensor:
        """Full-vocabulary teacher log-probabilities in fp32, ``[N, V]``.

        A sparse signal becomes a distribution on its top-k support (``-inf`` elsewhere).
        """
        if self.hidden is not None:
            return self.rows(slice(None)).dense_log_probs(temperature)
        if self.logits is not None:
            return torch.log_softmax(upcast(self.logits) / temperature, dim=-1)
        if self.values is None or self.indices is None or self.vocab_size is None:
            raise ValueError("this objective needs a teacher, but no teacher signal was given")
        sparse = torch.log_softmax(upcast(self.values) / temperature, dim=-1)
        out = sparse.new_full((sparse.shape[0], self.vocab_size), float("-inf"))
        return out.scatter(-1, self.indices.long(), sparse)


def as_signal(teacher: TeacherSignal | Tensor | None) -> TeacherSignal:
    """Accept plain tensors (dense logits) wherever a TeacherSignal is expected."""
    if teacher is None:
        return TeacherSignal.none()
    if isinstance(teacher, TeacherSignal):
        return teacher
    return TeacherSignal.dense(teacher)
