"""kdtool: distil a large causal language model into a small one.

The public names below are imported on first use (PEP 562), so that ``import kdtool`` alone (the
console script's launcher, ``kdtool.launch``) costs no pydantic and no objective modules.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kdtool.objective import Objective, ObjectiveOptions
    from kdtool.registry import available as available_objectives
    from kdtool.registry import get_objective
    from kdtool.targets import IGNORE_INDEX
    from kdtool.teacher import TeacherSignal

__version__ = "0.1.0"
# public name -> (module, attribute)
_EXPORTS = {
    "IGNORE_INDEX": ("kdtool.targets", "IGNORE_INDEX"),
    "Objective": ("kdtool.objective", "Objective"),
    "ObjectiveOptions": ("kdtool.objective", "ObjectiveOptions"),
    "TeacherSignal": ("kdtool.teacher", "TeacherSignal"),
    "available_objectives": ("kdtool.registry", "available"),
    "get_objective": ("kdtool.registry", "get_objective"),
}
__all__ = [
    "IGNORE_INDEX",
    "Objective",
    "ObjectiveOptions",
    "TeacherSignal",
    "__version__",
    "available_objectives",
    "get_objective",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kdtool' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(import_module(module), attribute)
    globals()[name] = value  # once: later lookups are plain module attributes
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
