"""Tools for proving a fused model equivalent: the assertion and hypothesis strategies fxrep's own tests use.

    from fxrep.testing import assert_fused_equivalent, branched_mlp_blocks
    @given(branched_mlp_blocks())
    def test_my_model(case): assert_fused_equivalent(case.model, case.inputs)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import EquivalenceError, InputError

DEFAULT_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def _state_snapshot(model: nn.Module):
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def relative_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    """max |expected - actual| / max |expected| (computed in float64)."""
    e, a = expected.detach().double(), actual.detach().double()
    scale = e.abs().max().item() if e.numel() else 0.0
    return (e - a).abs().max().item() / (scale if scale > 0 else 1.0)


def _outputs(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _outputs(item)]
    if isinstance(x, dict):
        return [t for k in sorted(x) for t in _outputs(x[k])]
    return []


def assert_fused_equivalent(model: nn.Module, inputs, *, fused=None, rtol: float | None = None,
                            patterns=None, check_unchanged: bool = True) -> torch.fx.GraphModule:
    """Fuse ``model`` (unless ``fused`` is given), run both on ``inputs`` and raise EquivalenceError when
    max |y - y_fused| / max |y| exceeds ``rtol`` (default by dtype: float32 1e-5, float64 1e-10, fp16 1e-2,
    bf16 2e-2). Also checks that fusing left ``model``'s parameters and buffers untouched. Returns the fused
    GraphModule."""
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    for t in inputs:
        if isinstance(t, torch.Tensor) and not (t.is_floating_point() or t.dtype in (torch.long, torch.int)):
            raise InputError(f"inputs of dtype {t.dtype} are not supported; use a float tensor")
    snapshot = _state_snapshot(model) if check_unchanged else None
    if fused is None:
        from .engine import fuse

        fused = fuse(model, patterns=patterns)
    if snapshot is not None:
        after = model.state_dict(keep_vars=True)
        for k, v in snapshot.items():
            if k not in after or not torch.equal(after[k].detach(), v):
                raise EquivalenceError(f"fusing modified the input model: '{k}' changed. fxrep must build new "
                                       "tensors, never edit the user's in place.")
    with torch.no_grad():
        try:
            expected = _outputs(model(*inputs))
        except Exception as e:  # noqa: BLE001 - re-raised with the fix named
            raise InputError(f"the original model failed on the example inputs "
                             f"({', '.join(str(tuple(t.shape)) for t in inputs if isinstance(t, torch.Tensor))}):"
                             f" {type(e).__name__}: {e}. Pass inputs of the shape the model expects.") from e
        actual = _outputs(fused(*inputs))
    if len(expected) != len(actual):
        raise EquivalenceError(f"the fused model returns {len(actual)} tensors, the original {len(expected)}")
    for i, (e, a) in enumerate(zip(expected, actual)):
        if e.shape != a.shape or e.dtype != a.dtype:
            raise EquivalenceError(f"output {i}: original {tuple(e.shape)} {e.dtype}, fused {tuple(a.shape)} {a.dtype}")
        tol = rtol if rtol is not None else DEFAULT_RTOL.get(e.dtype, 1e-5)
        err = relative_error(e, a)
        if not err <= tol:
            raise EquivalenceError(f"output {i}: max|delta|/max|y| = {err:.3g} > {tol:g}: the fused model does "
                                   "not compute what the original computes")
    return fused


def graph_code(model) -> str:
    """The code of a GraphModule, or of a module's trace; used to assert a graph was left alone."""
    return model.code if isinstance(model, torch.fx.GraphModule) else torch.fx.symbolic_trace(model).code


@dataclass
class Case:
    """One generated example: a model in eval mode and inputs for it, plus what the generator intended."""

    model: nn.Module
    inputs: tuple
    info: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Case({self.info})"


def clone_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
