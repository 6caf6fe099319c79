"""The objective contract shared by every token-level objective.

An objective is a small class with a ``name``, a one-line ``description``, a pydantic
``Options`` model of its hyper-parameters, and ``token_losses`` written on ``[N, V]`` logits
of the N *valid* target positions (the engine drops ``-100`` positions before calling it).
``loss`` is the plain-tensor entry point for tests and notebooks: mean over non-ignored tokens.

On-policy objectives (MiniLLM) additionally set ``on_policy = True``; see ``kdtool.rollout``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from kdtool.teacher import TeacherSignal, as_signal

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from kdtool.steps import StepContext
else:  # options and descriptions are read without torch (`kdtool objectives`, config checks)
    from kdtool.lazy import torch

IGNORE_INDEX = -100

# metric name -> (sum over tokens, token count); the engine reports sum / count.
Metrics = dict[str, tuple["Tensor", "Tensor"]]


class ObjectiveOptions(BaseModel):
    """Base for every objective's options: unknown keys are an error, not a silent no-op."""

    model_config = ConfigDict(extra="forbid")


class NoOptions(ObjectiveOptions):
    pass


class Objective:
    """Base class for objectives. Subclasses implement ``token_losses``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type[ObjectiveOptions]] = NoOptions
    needs_teacher: ClassVar[bool] = True
    supports_sparse: ClassVar[bool] = False
    on_policy: ClassVar[bool] = False

    def __init__(self, options: ObjectiveOptions | None = None, **kwargs: Any) -> None:
        if options is None:
            options = self.Options(**kwargs)
        elif kwargs:
            raise TypeError("pass either an Options object or keyword options, not both")
        self.options = options

    def token_stats(self, teacher: TeacherSignal, labels: Tensor) -> dict[str, Tensor]:
        """Per-token statistics ``{name: [n]}`` needed *before* any loss is computed.

        The engine calls this chunk by chunk (first pass) and concatenates the results, so
        a batch-level statistic (ATKD's uncertainty quantile) stays exact under chunking.
        Most objectives need none.
        """
        return {}

    def batch_stats(self, token_stats: dict[str, Tensor]) -> dict[str, Any]:
        """Turn the concatenated per-token statistics of all N valid tokens into what
        ``token_losses`` needs. Per-token tensors (first dim N) are sliced per chunk."""
        return dict(token_stats)

    def batches(self, loader: Iterable[dict[str, Tensor]], ctx: StepContext) -> Iterator[dict[str, Tensor]]:
        """Micro-batches for the trainer. Token-level objectives use the data as it is;
        on-policy objectives turn prompt batches into rollout mini-batches here."""
        from kdtool.steps import default_batches

        return default_batches(loader, ctx)

    def micro_batch_loss(self, ctx: StepContext, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Metrics]:
        """``(loss_sum, n_tokens, metric_sums)`` for one micro-batch; the trainer divides the
        gradient by the token count of the whole accumulated step (normalise once)."""
        from kdtool.steps import token_micro_batch_loss

        return token_micro_batch_loss(self, ctx, batch)

    def token_losses(
        self, student_logits: Tensor, teacher: TeacherSignal, labels: Tensor, stats: dict[str, Any]
    ) -> tuple[Tensor, Metrics]:
        """Per-token losses ``[N]`` for N valid positions, and metric sums.

        Args:
            student_logits: ``[N, V]`` student logits (any float dtype; upcast inside).
            teacher: the teacher signal for the same N rows.
            labels: ``[N]`` target ids, all valid.
            stats: output of ``batch_stats``, per-token entries restricted to these rows.
        """
        raise NotImplementedError

    def loss(
        self, student_logits: Tensor, teacher_logits: TeacherSignal | Tensor | None, labels: Tensor
    ) -> tuple[Tensor, dict[str, float]]:
        """Mean loss over non-ignored tokens, for plain tensors.

        Args:
            student_logits: ``[B, T, V]`` (or ``[N, V]``).
            teacher_logits: ``[B, T, V]`` dense logits, a ``TeacherSignal``, or ``None`` (sft).
            labels: ``[B, T]`` aligned with the logits; ``-100`` = ignored.

        Returns:
            ``(loss, metrics)``; an all-masked batch gives a loss of 0 with a finite gradient.
        """
        vocab = student_logits.shape[-1]
        student = student_logits.reshape(-1, vocab)
        flat_labels = labels.reshape(-1)
        keep = flat_labels != IGNORE_INDEX
        teacher = as_signal(teacher_logits).flatten().rows(keep)
        valid_labels = flat_labels[keep]
        stats = self.batch_stats(self.token_stats(teacher, valid_labels))
        per_token, metric_sums = self.token_losses(student[keep], teacher, valid_labels, stats)
        count = keep.sum().clamp(min=1)
        metrics = {k: (s / c.clamp(min=1)).item() for k, (s, c) in metric_sums.items()}
        return per_token.sum() / count, metrics


def rows_of_stats(stats: dict[str, Any], index: slice) -> dict[str, Any]:
    """Slice every per-token tensor in ``stats`` (first dim = tokens) to ``index``."""
    return {k: (v[index] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in stats.items()}


def token_metric(values: Tensor) -> tuple[Tensor, Tensor]:
    """A per-token metric as (sum, count), detached."""
    values = values.detach().float()
    return values.sum(), torch.tensor(values.numel(), device=values.device)
