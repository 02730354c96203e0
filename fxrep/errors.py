"""Errors fxrep raises for a user's mistake. Each message names the problem and the fix."""


class FxrepError(Exception):
    """Base class of every error fxrep raises on purpose."""


class TraceError(FxrepError):
    """The model could not be traced with torch.fx."""


class TrainingModeError(FxrepError):
    """The model is in training mode, where Dropout/DropPath are not the identity."""


class UnsupportedModelError(FxrepError):
    """The model holds tensors fxrep cannot rewrite (integer, quantized, meta device)."""


class PatternError(FxrepError):
    """A pattern is malformed or registered twice under one name."""


class EquivalenceError(FxrepError):
    """The fused model does not compute what the original computes."""


class InputError(FxrepError):
    """Example inputs are missing or do not fit the model."""


class InternalError(FxrepError):
    """fxrep built a graph that does not run: a bug in a pattern (named in the message), never the user's."""


class MissingDependencyError(FxrepError, ImportError):
    """An optional dependency (ExecuTorch for phones) is not installed; the message names the extra."""
