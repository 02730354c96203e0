"""Is a fused model the same function as its original? The comparison ``fuse(check=True)`` and
``fxrep.testing.assert_fused_equivalent`` share. A leaf module: torch only, no hypothesis, no generators."""

from __future__ import annotations

import torch
from torch import nn

from .errors import EquivalenceError, InputError
from .numerics import MODEL_RTOL
from .snapshot import ModelSnapshot

DEFAULT_RTOL = MODEL_RTOL  # by dtype; how each was set: docs/numerics.md


def relative_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    """max |expected - actual| / max |expected| over the finite values (computed in float64). NaNs and
    infinities must stand in the same places with the same values (a fully masked attention row is NaN in
    both); anywhere else they make the error infinite."""
    e, a = expected.detach().double(), actual.detach().double()
    same = (e.isnan() & a.isnan()) | (e.isinf() & (e == a))
    if bool(((~e.isfinite() | ~a.isfinite()) & ~same).any()):
        return float("inf")
    finite = e.isfinite()
    e, a = e[finite], a[finite]
    scale = e.abs().max().item() if e.numel() else 0.0
    return (e - a).abs().max().item() / (scale if scale > 0 else 1.0) if e.numel() else 0.0


def flat_tensors(x) -> list[torch.Tensor]:
    """The tensors of a (nested) output, in a fixed order: tuples and lists in order, dicts by sorted key,
    and dataclass-like outputs (Hugging Face ``ModelOutput``) through their dict view."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in flat_tensors(item)]
    if isinstance(x, dict):
        return [t for k in sorted(x) for t in flat_tensors(x[k])]
    return []


def signature(outputs) -> list[tuple]:
    """(shape, dtype) of every output tensor."""
    return [(tuple(t.shape), t.dtype) for t in flat_tensors(outputs)]


def compare_outputs(expected, actual, rtol: float | None = None) -> None:
    """Raise EquivalenceError unless the outputs have one structure and max|delta|/max|y| <= rtol each
    (``relative_error``; rtol by dtype when None, ``numerics.MODEL_RTOL``: float32 1e-5, float64 1e-10,
    float16 1e-2, bfloat16 2e-2)."""
    expected, actual = flat_tensors(expected), flat_tensors(actual)
    if len(expected) != len(actual):
        raise EquivalenceError(f"the fused model returns {len(actual)} tensors, the original {len(expected)}")
    for i, (e, a) in enumerate(zip(expected, actual)):
        if e.shape != a.shape or e.dtype != a.dtype:
            raise EquivalenceError(f"output {i}: original {tuple(e.shape)} {e.dtype}, fused {tuple(a.shape)} "
                                   f"{a.dtype}")
        tol = rtol if rtol is not None else DEFAULT_RTOL.get(e.dtype, DEFAULT_RTOL[torch.float32])
        err = relative_error(e, a)
        if not err <= tol:
            raise EquivalenceError(f"output {i}: max|delta|/max|y| = {err:.3g} > {tol:g}: the fused model "
                                   "does not compute what the original computes")


def check_inputs(inputs) -> tuple:
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    for t in inputs:
        if isinstance(t, torch.Tensor) and not (t.is_floating_point() or t.dtype in (torch.long, torch.int,
                                                                                      torch.bool)):
            raise InputError(f"inputs of dtype {t.dtype} are not supported; use float tensors (integer or "
                             "boolean tensors for indices and masks)")
    return tuple(inputs)


def assert_equivalent(model: nn.Module, fused: nn.Module, inputs, *, rtol: float | None = None,
                      snapshot: ModelSnapshot | None = None) -> None:
    """Run ``model`` and ``fused`` on ``inputs`` and compare (``compare_outputs``). With ``snapshot`` (taken
    before fusing), also raise EquivalenceError if ``model`` changed since."""
    inputs = check_inputs(inputs)
    if snapshot is not None:
        changed = snapshot.diff(model)
        if changed:
            raise EquivalenceError(f"fusing modified the input model: {changed}. fxrep must build new "
                                   "tensors and leave the user's modules as they were (tracing included).")
    with torch.no_grad():
        try:
            expected = model(*inputs)
        except Exception as e:  # noqa: BLE001 - re-raised with the fix named
            shapes = ", ".join(str(tuple(t.shape)) for t in inputs if isinstance(t, torch.Tensor))
            raise InputError(f"the original model failed on the example inputs ({shapes}): "
                             f"{type(e).__name__}: {e}. Pass inputs of the shape the model expects.") from e
        actual = fused(*inputs)
    compare_outputs(expected, actual, rtol)
