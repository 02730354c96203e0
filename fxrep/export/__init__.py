"""Deploying fused models: ``torch.export``, ONNX, ExecuTorch, save/load. The deployment subpackage: the
compiler core never imports it.

    fused = fxrep.fuse(model, example_inputs=(x,))
    fxrep.export.save_fused(fused, "deploy/", (x,))   # fused.pt2 (torch.export) + fused.safetensors
    again = fxrep.export.load_fused("deploy/")        # an nn.Module computing the same function
    fxrep.export.to_onnx(fused, (x,), "deploy/fused.onnx")
    fxrep.export.to_executorch(fused, (x,), "deploy/fused.pte")   # phones (executorch.py; mobile extra)
    program = fxrep.export.prune_unread_rows(fxrep.export.export_program(fused, (x,)), (x,))  # rows/
"""

from .executorch import calibration_inputs, load_executorch, quantize_int8, run_executorch, to_executorch
from .files import export_program, load_fused, save_fused, to_onnx
from .rows import prune_unread_rows

__all__ = ["export_program", "save_fused", "load_fused", "to_onnx", "to_executorch", "quantize_int8",
           "prune_unread_rows", "calibration_inputs", "load_executorch", "run_executorch"]
