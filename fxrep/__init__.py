"""fxrep: make branched Vision Transformers shallower without changing what they compute.

``fxrep.fuse(model)`` merges parallel branches of a ``torch.fx`` graph into single wider or collapsed ops,
applying only the exact identities of docs/identities.md whose preconditions it has checked.
"""

from .api import fuse
from .errors import (
                     EquivalenceError,
                     FxrepError,
                     InputError,
                     InternalError,
                     MissingDependencyError,
                     PatternError,
                     TraceError,
                     TrainingModeError,
                     UnsupportedModelError,
)
from .pattern import FunctionPattern, FuseContext, Match, Pattern, Skip
from .pipeline import trace
from .registry import PatternRegistry, default_registry
from .report import FuseReport
from .stats import count_flops, count_params

__version__ = "0.1.0"

__all__ = [
    "fuse", "trace", "FuseReport", "Match", "Skip", "Pattern", "FunctionPattern", "FuseContext",
    "PatternRegistry", "default_registry", "count_flops",
    "count_params", "FxrepError", "TraceError", "TrainingModeError", "UnsupportedModelError", "PatternError",
    "EquivalenceError", "InputError", "InternalError", "MissingDependencyError",
]
