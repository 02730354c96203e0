"""Fused models written as files: ``torch.export`` programs (``.pt2``), safetensors, ONNX."""

from __future__ import annotations

from pathlib import Path

import torch

from ..equivalence import check_inputs
from ..errors import InputError
from ..program import as_program
from .rows import prune_unread_rows


def export_program(gm: torch.nn.Module, example_inputs: tuple) -> torch.export.ExportedProgram:
    """``torch.export.export`` of a fused model, without gradients; a model in training mode is refused
    (``TrainingModeError``), not switched to eval mode."""
    return as_program(gm, example_inputs)


def save_fused(gm: torch.nn.Module, directory: str | Path, example_inputs: tuple) -> Path:
    """Write ``fused.pt2`` (graph and weights, ``torch.export.save``) and ``fused.safetensors`` (the weights
    alone, for tools that read safetensors) into ``directory``."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    torch.export.save(export_program(gm, example_inputs), out / "fused.pt2")
    save_file({k: v.detach().contiguous().cpu() for k, v in gm.state_dict().items()},
              str(out / "fused.safetensors"))
    return out


def load_fused(directory: str | Path) -> torch.nn.Module:
    path = Path(directory) / "fused.pt2"
    if not path.is_file():
        raise InputError(f"{path} not found: save the model with fxrep.export.save_fused first")
    return torch.export.load(path).module()


def to_onnx(gm: torch.nn.Module, example_inputs: tuple, path: str | Path, opset: int | None = None, *,
            prune_rows: bool = True) -> Path:
    """Export to ONNX with torch's exporter (needs the ``export`` extra: onnx, onnxscript). Takes a module or
    an ExportedProgram; a module in training mode is refused (``TrainingModeError``), not switched to eval
    mode. With ``prune_rows`` (default) the program computes only the token rows its outputs read
    (``prune_unread_rows``, checked against the unpruned program on ``example_inputs``)."""
    inputs = check_inputs(example_inputs)
    program = as_program(gm, inputs)
    if prune_rows:
        program = prune_unread_rows(program, inputs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"opset_version": opset} if opset else {}
    with torch.no_grad():
        torch.onnx.export(program, dynamo=True, **kwargs).save(str(path))
    return path
