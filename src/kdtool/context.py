"""What a step may use for one micro-batch: the models, the tokenizer, the engine's settings and
the few run settings a step reads (``RunSettings``), as typed fields.

The trainer builds one ``StepContext`` per run; tests build small ones directly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch

from kdtool.distributed import DistInfo, RankSync

if TYPE_CHECKING:
    from kdtool.data import TokenizedDataset


@dataclass(frozen=True)
class RunSettings:
    """The run settings a step reads (a narrow view of ``DistillConfig``)."""

    seed: int = 0
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 512
    max_prompt_length: int | None = None
    responses: str = "reference"  # off-policy responses: "reference" or "teacher"
    student_share: float = 0.0  # share of micro-batches the student answers (on-policy)
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0

    @classmethod
    def of(cls, config: Any) -> RunSettings:
        """The same-named fields of a ``DistillConfig``."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})

    @property
    def samples_responses(self) -> bool:
        """Whether some micro-batches train on sampled responses instead of the data's."""
        return self.responses != "reference" or self.student_share > 0


@dataclass
class StepContext:
    """Everything a step may need for one micro-batch.

    Attributes:
        student: the trainable causal LM.
        teacher: the live teacher (eval mode, no grad), or ``None``.
        teacher_cache: a sparse teacher cache (``kdtool.cache.TeacherCache``), or ``None``.
        tokenizer: the shared tokenizer (its pad and EOS ids are used).
        stop_token_ids: tokens besides EOS that end a sampled response (chat end of turn).
        vocab_size: the vocabulary both models are compared on.
        device: where the student's batches go.
        chunk_size: rows per chunk of the token-loss engine (``None`` = its default).
        autocast_dtype: autocast dtype of the forwards (``None`` = off).
        generator: seeds sampling (rollouts), one per rank.
        settings: the run settings a step reads.
        train_dataset: the training set (minillm's default LM corpus).
        dist: this process's rank and world size.
        student_call: under FSDP2, the root module every student call goes through.
        teacher_forward: a sharded teacher's hidden-state forward (``--fsdp-teacher``).
        teacher_call: a sharded teacher's full forward (rollouts).
        rank_sync: agreement of loop bounds over ranks, when a model is sharded.
    """

    student: Any
    teacher: Any | None
    teacher_cache: Any | None
    tokenizer: Any
    vocab_size: int
    device: torch.device
    stop_token_ids: tuple[int, ...] = ()
    chunk_size: int | None = None
    autocast_dtype: torch.dtype | None = None
    generator: torch.Generator | None = None
    settings: RunSettings = field(default_factory=RunSettings)
    train_dataset: TokenizedDataset | None = None
    dist: DistInfo = field(default_factory=DistInfo)
    student_call: Callable[..., Any] | None = None
    teacher_forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    teacher_call: Callable[..., Any] | None = None
    rank_sync: RankSync | None = None

    @property
    def teacher_sharded(self) -> bool:
        return self.teacher_forward is not None

    @property
    def pad_id(self) -> int:
        """The tokenizer's pad id (``kdtool.models.load_tokenizer`` sets pad = EOS when absent)."""
        return int(self.tokenizer.pad_token_id)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)
