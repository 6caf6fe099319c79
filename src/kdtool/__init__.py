"""kdtool: distil a large causal language model into a small one."""

from kdtool.objective import Objective, ObjectiveOptions
from kdtool.registry import available as available_objectives
from kdtool.registry import get_objective
from kdtool.targets import IGNORE_INDEX
from kdtool.teacher import TeacherSignal

__version__ = "0.1.0"
__all__ = [
    "IGNORE_INDEX",
    "Objective",
    "ObjectiveOptions",
    "TeacherSignal",
    "__version__",
    "available_objectives",
    "get_objective",
]
