"""``torch`` imported on first use rather than when a module that mentions it is imported.

The objectives, their pydantic options and the few modules they are written in (``objective``,
``teacher``, ``divergence``, ``sparse``) are imported by ``kdtool objectives``, by config
validation and by ``import kdtool``, none of which computes anything. Importing torch costs
1–3 s, so these modules write ``from kdtool.lazy import torch`` and pay for it only when a tensor
operation runs. Type checkers see the real module (the import sits under ``TYPE_CHECKING``)::

    if TYPE_CHECKING:
        import torch
        from torch import Tensor
    else:
        from kdtool.lazy import torch

Modules that run tensor code anyway (engine, trainer, models, ...) import torch directly.
"""

from __future__ import annotations

import importlib
import types
from typing import Any


class LazyModule(types.ModuleType):
    """A stand-in for a module that imports it on the first attribute access.

    Each attribute is copied onto the stand-in once fetched, so later look-ups are ordinary
    attribute hits (no per-call overhead in tensor loops). The real module enters
    ``sys.modules`` only when first used, so ``"torch" in sys.modules`` stays a faithful
    test of whether torch was loaded.
    """

    def __getattr__(self, attr: str) -> Any:
        value = getattr(importlib.import_module(self.__name__), attr)
        setattr(self, attr, value)
        return value


torch = LazyModule("torch")
