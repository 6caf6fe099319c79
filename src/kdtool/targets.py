"""Which positions a model is trained on: the label convention shared by data, objectives and steps.

Labels are token ids aligned with ``input_ids``; ``IGNORE_INDEX`` marks positions without a target
(prompt tokens, padding). A causal LM predicts token t + 1 from position t, so the targets of the
logits at positions ``[:, :-1]`` are ``labels[:, 1:]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

IGNORE_INDEX = -100


def shifted_targets(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Shifted labels ``[B, T-1]`` and the mask of the positions that have a target."""
    shifted = labels[:, 1:]
    return shifted, shifted != IGNORE_INDEX
