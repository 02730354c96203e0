"""``assert_fused_equivalent``: fuse a model and prove the result computes what it computes."""

from __future__ import annotations

import torch
from torch import nn

from ..api import fuse
from ..equivalence import assert_equivalent, check_inputs
from ..snapshot import ModelSnapshot


def assert_fused_equivalent(model: nn.Module, inputs, *, fused=None, rtol: float | None = None,
                            patterns=None, check_unchanged: bool = True) -> torch.fx.GraphModule:
    """Fuse ``model`` (unless ``fused`` is given), run both on ``inputs`` and raise EquivalenceError when
    max |y - y_fused| / max |y| exceeds ``rtol`` (default by dtype: float32 1e-5, float64 1e-10, fp16 1e-2,
    bf16 2e-2). Also checks that fusing left ``model``'s parameters, buffers and every attribute of every
    module (caches and other containers included) untouched. Returns the fused GraphModule."""
    inputs = check_inputs(inputs)
    snapshot = ModelSnapshot(model) if check_unchanged else None
    if fused is None:
        fused = fuse(model, patterns=patterns, example_inputs=inputs)
    assert_equivalent(model, fused, inputs, rtol=rtol, snapshot=snapshot)
    return fused
