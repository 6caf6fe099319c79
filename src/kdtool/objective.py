"""The objective contract: pure math on tensors.

An objective is a small class with a ``name``, a one-line ``description``, a pydantic ``Options``
model of its hyper-parameters (``Objective[MyOptions]`` sets it and types ``self.options``), and
``token_losses`` written on ``[N, V]`` logits of the N *valid* target positions (the engine drops
``-100`` positions and cuts the rows into chunks before calling it). ``loss`` is the plain-tensor
entry point for tests and notebooks: mean over non-ignored tokens.

An objective never sees a model, an optimizer or a data loader. How a micro-batch is produced and
costed is a *step* (``kdtool.steps.TokenStep`` on the data's references; ``kdtool.onpolicy.RolloutStep``
on the student's samples, for objectives with ``needs_rollouts``), which the trainer picks from the
objective's class attributes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, get_args, get_origin

from pydantic import BaseModel, ConfigDict

from kdtool.targets import IGNORE_INDEX
from kdtool.teacher import TeacherSignal, as_signal

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:  # options and descriptions are read without torch (`kdtool objectives`, config checks)
    from kdtool.lazy import torch

# metric name -> (sum over tokens, token count); the engine reports sum / count.
Metrics = dict[str, tuple["Tensor", "Tensor"]]


class ObjectiveOptions(BaseModel):
    """Base for every objective's options: unknown keys are an error, not a silent no-op."""

    model_config = ConfigDict(extra="forbid")


class NoOptions(ObjectiveOptions):
    pass


OptionsT = TypeVar("OptionsT", bound=ObjectiveOptions)


class Objective(Generic[OptionsT]):
    """Base class for objectives. Subclasses implement ``token_losses``.

    Class attributes:
        needs_teacher: the loss reads the teacher signal (``sft`` does not).
        supports_sparse: the loss works from a sparse top-k teacher (``--teacher-cache``); see
            ``accepts_sparse`` for objectives where it depends on the options.
        needs_rollouts: micro-batches are the student's own samples (the rollout step), and
            ``token_losses`` reads per-token rollout statistics (``stats``) besides the teacher.
        scores_references: ``token_losses`` is defined on reference tokens alone, so it can be
            measured on held-out data and checked against the engine's contract (not minillm).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type[ObjectiveOptions]] = NoOptions
    needs_teacher: ClassVar[bool] = True
    supports_sparse: ClassVar[bool] = False
    needs_rollouts: ClassVar[bool] = False
    scores_references: ClassVar[bool] = True

    options: OptionsT

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """``class X(Objective[XOptions])`` sets ``X.Options = XOptions``."""
        super().__init_subclass__(**kwargs)
        if "Options" in cls.__dict__:
            return
        for base in getattr(cls, "__orig_bases__", ()):
            origin = get_origin(base)
            if isinstance(origin, type) and issubclass(origin, Objective):
                (arg,) = get_args(base)
                if isinstance(arg, type) and issubclass(arg, ObjectiveOptions):
                    cls.Options = arg

    def __init__(self, options: OptionsT | None = None, **kwargs: Any) -> None:
        if options is None:
            options = self.Options(**kwargs)  # type: ignore[assignment]
        elif kwargs:
            raise TypeError("pass either an Options object or keyword options, not both")
        self.options = options  # type: ignore[assignment]

    @classmethod
    def accepts_sparse(cls, options: ObjectiveOptions) -> bool:
        """Whether these options can train from a sparse teacher cache (checked with the config)."""
        return cls.supports_sparse

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

    def token_losses(
        self, student_logits: Tensor, teacher: TeacherSignal, labels: Tensor, stats: dict[str, Any]
    ) -> tuple[Tensor, Metrics]:
        """Per-token losses ``[N]`` for N valid positions, and metric sums.

        Args:
            student_logits: ``[N, V]`` student logits (any float dtype; upcast inside).
            teacher: the teacher signal for the same N rows.
            labels: ``[N]`` target ids, all valid.
            stats: output of ``batch_stats`` (plus a step's per-token inputs, e.g. rollout
                advantages), per-token entries restricted to these rows.
        """
        raise NotImplementedError

    def token_losses_and_grad(
        self, student_logits: Tensor, teacher: TeacherSignal, labels: Tensor, stats: dict[str, Any]
    ) -> tuple[Tensor, Metrics, Tensor] | None:
        """Optional closed form: ``token_losses`` and d(Σ losses)/d(student_logits) ``[N, V]``,
        without autograd, or ``None`` (the default): the engine then differentiates
        ``token_losses`` itself. Where given, it must agree with autograd on ``token_losses``:
        the engine contract tests check the gradient of every registered objective's options
        against the unchunked autograd reference."""
        return None

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
