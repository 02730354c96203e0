"""Checks of a user's model before fxrep touches it: eval mode, float weights on a real device, not
quantized."""

from __future__ import annotations

import torch
from torch import fx, nn

from .errors import TrainingModeError, UnsupportedModelError

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def training_modules(model: nn.Module) -> list[str]:
    """The names of the modules in training mode that change what ``model`` computes."""
    if isinstance(model, fx.GraphModule):
        # only the modules its graph calls matter: symbolic_trace makes the GraphModule and the containers on
        # the way to its leaves fresh modules in training mode, which change nothing it computes (and
        # ExportedProgram.module() is a GraphModule in training mode that cannot even be put in eval mode)
        called = {n.target for n in model.graph.nodes if n.op == "call_module"}
        modules = [(f"{t}.{name}".rstrip("."), m) for t in called
                   for name, m in model.get_submodule(t).named_modules()]
    else:
        modules = list(model.named_modules())
    return [name or type(model).__name__ for name, m in modules if m.training and not _is_export_guard(m)]


def validate(model: nn.Module) -> None:
    """Raise a clear FxrepError when ``model`` cannot be fused exactly as it is."""
    training = training_modules(model)
    if training:
        raise TrainingModeError(
            f"the model is in training mode (e.g. {', '.join(training[:3])}): Dropout and DropPath are "
            "random there, so no rewrite is exact. Call model.eval() before fxrep.fuse(model).")
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise UnsupportedModelError(
                f"'{name}' is on the meta device: it has no values to fold. Materialize the model first "
                "(model.to_empty(device='cpu') and load a state_dict) and call fuse again.")
        if t.is_quantized:
            raise UnsupportedModelError(
                f"'{name}' is a quantized tensor ({t.dtype}): fxrep folds float weights only. Fuse the float "
                "model first, then quantize the fused model.")
        if isinstance(t, nn.Parameter) and t.dtype not in SUPPORTED_DTYPES:
            raise UnsupportedModelError(
                f"parameter '{name}' has dtype {t.dtype}; fxrep supports "
                f"{', '.join(map(str, SUPPORTED_DTYPES))}."
                " Convert the model with model.float() before fusing.")
    for name, m in model.named_modules():
        if type(m).__module__.startswith("torch.ao.nn.quantized"):
            raise UnsupportedModelError(
                f"'{name}' is a quantized module ({type(m).__name__}): fuse the float model, then quantize.")


def _is_export_guard(module: nn.Module) -> bool:
    """``ExportedProgram.module()``'s ``_guards_fn``: checks input shapes, has no mode, computes nothing."""
    return type(module).__name__ == "GuardsFn" and type(module).__module__.startswith("torch.export")
