"""What an on-policy objective declares to the rollout step: how responses are sampled and served
(``RolloutSettings``) and an optional language-modelling term (``LMTerm``). Plain data, so that an
objective can state them without importing the step, the stream or the sampler."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kdtool.objective import Objective


@dataclass(frozen=True)
class RolloutSettings:
    """How responses are sampled (student at ``temperature``, mixed with the teacher by ``alpha``,
    top-k / top-p), how many make a buffer, and how the buffer is served (``inner_epochs``
    shuffled passes in micro-batches of ``mini_batch_size`` rollouts)."""

    max_new_tokens: int
    rollout_batch_size: int
    mini_batch_size: int
    inner_epochs: int = 1
    alpha: float = 0.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


@dataclass(frozen=True)
class LMTerm:
    """L_PT: ``weight`` × (mean loss of ``objective`` over an LM batch) × the micro-batch count.

    ``data``: an LM corpus file (``kdtool.lm_corpus``), ``None`` = the training set;
    ``batch_size``: LM examples per micro-batch (``None`` = the run's batch size).
    """

    objective: Objective[Any]
    weight: float
    data: str | None = None
    batch_size: int | None = None
