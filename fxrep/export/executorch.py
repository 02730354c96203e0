"""Phones: ExecuTorch programs lowered to XNNPACK (the CPU kernel library Android and iOS apps run), in fp32
or int8 (PT2E post-training quantization with the XNNPACK quantizer: symmetric, per-channel weights).

    fxrep.export.to_executorch(fused, (x,), "model.pte")                                # fp32
    fxrep.export.to_executorch(fused, (x,), "model_int8.pte", quantize="int8", calibration=[(x1,), (x2,)])
    outputs = fxrep.export.run_executorch("model.pte", (x,))

``executorch`` is an optional dependency (``pip install 'fxrep[mobile]'``); fxrep imports it only here, when
a function of this module is called. Quantize the fused model, not the branched one: fuse first.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from ..equivalence import check_inputs
from ..errors import InputError, MissingDependencyError
from ..program import as_program
from .rows import prune_unread_rows
from .xnnpack import keeps_float, rewrite_for_xnnpack

QUANTIZE_MODES = (None, "int8")


def _require_executorch():
    try:
        import executorch.exir  # noqa: F401
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(
            f"ExecuTorch is not installed ({e}). Install the mobile extra: pip install 'fxrep[mobile]' "
            "(or pip install executorch).") from e


def calibration_inputs(dataset, count: int = 200) -> list[tuple]:
    """``count`` inputs spread evenly over ``dataset`` (items ``(image, label)``), each a one-image batch:
    calibration data for ``quantize_int8``."""
    step = max(1, len(dataset) // count)
    return [(dataset[i][0].unsqueeze(0),) for i in range(0, len(dataset), step)][:count]


def quantize_int8(program: torch.export.ExportedProgram, example_inputs: tuple, calibration) -> \
        torch.export.ExportedProgram:
    """PT2E int8 post-training quantization for XNNPACK (symmetric, per-channel weights), calibrated on
    ``calibration`` (an iterable of input tuples)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if calibration is None or not isinstance(calibration, Iterable):
        raise InputError(
            "int8 quantization needs calibration data: pass calibration=[(x,), ...], a few hundred real "
            "inputs (fxrep does not calibrate on random data, whose activation ranges are not the model's).")
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    quantizer.set_filter_function(lambda node: not keeps_float(node))  # LayerNorm statistics stay float
    prepared = prepare_pt2e(program.module(), quantizer)
    seen = 0
    with torch.no_grad():
        for batch in calibration:
            prepared(*check_inputs(batch))
            seen += 1
    if seen == 0:
        raise InputError("the calibration data is empty: pass at least one input tuple.")
    converted = convert_pt2e(prepared)
    with torch.no_grad():
        return torch.export.export(converted, example_inputs)


def to_executorch(model, example_inputs, path: str | Path, *, quantize: str | None = None,
                  calibration=None, xnnpack_rewrites: bool = True, prune_rows: bool = True) -> Path:
    """Write ``model`` (a fused GraphModule, any nn.Module, or an ExportedProgram) as an XNNPACK-lowered
    ExecuTorch program (``.pte``) at ``path``; ``quantize="int8"`` quantizes it first (see ``quantize_int8``).
    ``xnnpack_rewrites`` first spells attention, views and LayerNorm so that XNNPACK takes the whole graph
    (``fxrep.export.xnnpack``; about half the latency of the program as exported); False lowers it as
    exported. ``prune_rows`` computes only the token rows the outputs read (``fxrep.export.rows``: a
    classifier's last block for its class token alone). Both are exact, checked on ``example_inputs``.
    Returns the path."""
    if quantize not in QUANTIZE_MODES:
        raise InputError(f"quantize={quantize!r}: choose one of {QUANTIZE_MODES}.")
    _require_executorch()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    example_inputs = check_inputs(example_inputs)
    program = as_program(model, example_inputs)
    if prune_rows:
        program = prune_unread_rows(program, example_inputs)
    if xnnpack_rewrites:
        program = rewrite_for_xnnpack(program, example_inputs)
    if quantize == "int8":
        program = quantize_int8(program, example_inputs, calibration)
    lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(lowered.buffer)
    return path


def load_executorch(path: str | Path):
    """The ``forward`` method of a ``.pte`` program, loaded with ``executorch.runtime`` (call ``execute``)."""
    _require_executorch()
    from executorch.runtime import Runtime

    path = Path(path)
    if not path.is_file():
        raise InputError(f"no ExecuTorch program at {path}: write one with fxrep.export.to_executorch.")
    return Runtime.get().load_program(path).load_method("forward")


def run_executorch(path_or_method, inputs) -> list:
    """Run a ``.pte`` program (a path, or a method from ``load_executorch``) on ``inputs``; its outputs."""
    method = load_executorch(path_or_method) if isinstance(path_or_method, (str, Path)) else path_or_method
    return list(method.execute(list(check_inputs(inputs))))
