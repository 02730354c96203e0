"""``fxrep.fuse``, the front door: what the caller handed in decides how the model is captured.

- an ``ExportedProgram``: fused as a program, an ExportedProgram comes back (``fxrep.program``);
- a ``torch.fx.GraphModule``: fused as it is, a GraphModule comes back (``fxrep.pipeline``);
- any other ``nn.Module``: traced with torch.fx; where fx cannot trace it (einops, Hugging Face, Python
  control flow), captured with ``torch.export`` on the example inputs instead, with a dynamic batch where
  the model allows one. Either way a module comes back that is called like the original: the same
  arguments, the same output structure (a Hugging Face ``ModelOutput`` stays one). The report says which
  capture was used and why (``report.capture``).

The engine only ever sees a GraphModule; this module only decides what it is given.
"""

from __future__ import annotations

import inspect
import traceback
from pathlib import Path

import torch
from torch import fx, nn
from torch.export import Dim, ExportedProgram

from . import pipeline, program
from .errors import InputError, TraceError
from .snapshot import preserved
from .validation import validate

CAPTURES = ("auto", "fx", "export")
_TORCH_DIR = str(Path(torch.__file__).parent)


def fuse(model, *, example_inputs=None, patterns=None, check: bool = False, rtol: float | None = None,
         concrete_args: dict | None = None, capture: str = "auto", autotune: bool = False, decisions=None,
         max_sweeps: int = 50, prune_rows: bool = True):
    """Rewrite ``model`` into an equivalent one with parallel branches merged.

    Args:
        model: an ``nn.Module`` in eval mode, a ``torch.fx.GraphModule`` or a
            ``torch.export.ExportedProgram``. It is never modified: fxrep builds new parameters and a new
            graph.
        example_inputs: a tensor or tuple of tensors (positional arguments of ``forward``). They give the
            report its FLOP counts, enable ``check``, let fxrep capture a model torch.fx cannot trace, and are
            run through the fused graph before it is returned: a graph that does not run on them is an fxrep
            bug, raised as InternalError.
        patterns: a ``PatternRegistry`` or list of patterns (default: ``default_registry()``).
        check: run original and fused model on ``example_inputs`` and raise EquivalenceError if they differ
            by more than ``rtol`` (default by dtype: ``fxrep.numerics.MODEL_RTOL``) relative to max |y|.
        concrete_args: for torch.fx tracing, the ``forward`` arguments to fix (as in
            ``torch.fx.symbolic_trace``). Default: optional ``None``/``bool`` arguments other than the first
            and other than those ``example_inputs`` supply as tensors. A fixed argument keeps a runtime
            guard: calling the fused model with another value raises.
        capture: how an ``nn.Module`` becomes a graph: ``"auto"`` (torch.fx, and torch.export where fx cannot
            trace it), ``"fx"`` or ``"export"``. A GraphModule or ExportedProgram is used as it is.
        autotune: decide whether parallel branches widen by timing both forms on this machine (like cuDNN's
            benchmark mode). Default: a table of kernel times shipped with fxrep decides, so the fused graph
            is the same on every machine and under any load.
        decisions: ``report.decisions`` of an earlier call (or its ``decisions_as_dict()``, e.g. from JSON):
            replayed without timing, so an autotuned result can be reproduced exactly.
        max_sweeps: how many sweeps a phase may take to reach its fixed point.
        prune_rows: with ``example_inputs``, compute only the token rows the outputs read (a classifier's
            last block runs its attention queries, output projection and MLP on the class token alone;
            ``fxrep.row_pruning``), checked against the unpruned graph on the example inputs. ``False``
            computes every row.

    Returns:
        For an ExportedProgram, a new ExportedProgram (report in ``graph_module.meta["fxrep_report"]``);
        otherwise a new ``torch.fx.GraphModule`` (report in ``meta["fxrep_report"]``, ``print`` it).
    """
    options = dict(autotune=autotune, decisions=decisions, max_sweeps=max_sweeps, prune_rows=prune_rows)
    if capture not in CAPTURES:
        raise InputError(f"capture={capture!r}: use one of {', '.join(map(repr, CAPTURES))}")
    if isinstance(model, ExportedProgram):
        if concrete_args is not None:
            raise InputError("concrete_args fix arguments while tracing; an ExportedProgram is traced "
                             "already. Leave concrete_args out.")
        return program.fuse_program(model, example_inputs=example_inputs, patterns=patterns, check=check,
                                    rtol=rtol, **options)
    if not isinstance(model, nn.Module):
        raise InputError(f"fxrep.fuse takes an nn.Module, a torch.fx.GraphModule or a "
                         f"torch.export.ExportedProgram, not {type(model).__name__}")
    common = dict(patterns=patterns, check=check, rtol=rtol, **options)
    if isinstance(model, fx.GraphModule):
        return _traced(model, example_inputs, concrete_args, common, "the GraphModule given")
    if capture == "export":
        return _fuse_exported(model, example_inputs, why="capture='export'", **common)
    return _fuse_module(model, example_inputs, concrete_args, common, fall_back=capture == "auto")


def _fuse_module(model, example_inputs, concrete_args, common: dict, fall_back: bool):
    """torch.fx first; where it cannot trace the model and ``fall_back``, torch.export on the inputs."""
    try:
        return _traced(model, example_inputs, concrete_args, common, "torch.fx")
    except TraceError as e:
        if not fall_back:
            raise
        fx_failure = e
    if example_inputs is None:
        raise TraceError(f"{_first_line(fx_failure)}\nFix: fxrep can capture this model with torch.export "
                         "instead, which needs inputs to run it on: "
                         "fxrep.fuse(model, example_inputs=(x,)).") from None
    if concrete_args is not None:
        raise TraceError(f"{_first_line(fx_failure)}\nFix: concrete_args apply to torch.fx tracing only; "
                         "leave them out to let fxrep capture the model with torch.export on the example "
                         "inputs.") from None
    why = _first_line(fx_failure)  # "torch.fx could not trace <model> (failed inside module ...): ..."
    return _fuse_exported(model, example_inputs, why=why, fx_failure=fx_failure, **common)


def _traced(model, example_inputs, concrete_args, common: dict, capture: str):
    gm = pipeline.fuse(model, example_inputs=example_inputs, concrete_args=concrete_args, **common)
    gm.meta["fxrep_report"].capture = capture
    return gm


def _fuse_exported(model, example_inputs, *, why: str, fx_failure=None, check=False, rtol=None, **common):
    """Capture ``model`` with torch.export, fuse the program, and return its module: called like ``model``
    (arguments and output structure), any batch size where the model allows a dynamic one."""
    if example_inputs is None:
        raise InputError("capturing with torch.export needs example inputs: fxrep.fuse(model, "
                         "example_inputs=(x,), capture='export')")
    validate(model)  # eval mode, supported dtypes: the same refusals as the fx path, before exporting
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    exported, batch = _export(model, inputs, fx_failure)
    fused = program.fuse_program(exported, **common)
    module = fused.module()
    _accept_calls_like(model, module, len(inputs))
    report = fused.graph_module.meta["fxrep_report"]
    report.capture = f"torch.export ({batch}); {why}"
    module.meta["fxrep_report"] = report
    if check:
        pipeline.check_equivalent(model, module, inputs, rtol, report)
    return module


class _ArgumentsAsCaptured:
    """A forward pre-hook that lets the captured module be called as ``model`` is: arguments by keyword are
    put in the positions they were captured in. An argument the capture did not see may be passed with its
    default only: the graph was captured with it."""

    def __init__(self, signature: inspect.Signature, captured: list, model_name: str):
        self.signature, self.captured, self.model_name = signature, captured, model_name

    def __call__(self, module, args, kwargs):
        if not kwargs:
            return None  # positional, as captured
        bound = self.signature.bind(*args, **kwargs)
        for name, value in bound.arguments.items():
            parameter = self.signature.parameters[name]
            if parameter.kind is parameter.VAR_KEYWORD and value:
                raise InputError(f"{', '.join(value)}: the fused {self.model_name} was captured without "
                                 "these arguments. Fuse again with example inputs that pass them.")
            default = parameter.default
            if name not in self.captured and parameter.kind is not parameter.VAR_KEYWORD and \
                    value is not default and value != default:
                raise InputError(
                    f"{name}={value!r}: the fused {self.model_name} was captured with {name} at its default "
                    f"({default!r}), which its graph keeps. Fuse again with example inputs that pass it.")
        return tuple(bound.arguments[n] for n in self.captured if n in bound.arguments), {}


def _accept_calls_like(model, module, count: int) -> None:
    """Let ``module`` (captured from ``model`` on ``count`` positional inputs) take keyword arguments too."""
    signature = inspect.signature(model.forward)
    if any(p.kind is p.VAR_POSITIONAL for p in signature.parameters.values()):
        return  # no names to put back in place: called by position, as captured
    captured = list(signature.bind_partial(*range(count)).arguments)
    module.register_forward_pre_hook(_ArgumentsAsCaptured(signature, captured, type(model).__name__),
                                     with_kwargs=True, prepend=True)  # before torch's input checks


def _export(model, inputs: tuple, fx_failure) -> tuple[ExportedProgram, str]:
    """(program, what its batch is). The batch (dim 0 of every tensor input) is made dynamic where the model
    allows it; a batch of one is captured at two (export fixes sizes 0 and 1). Else the shapes are static."""
    capture_inputs = tuple(torch.cat([t, t]) if _batched(t) and t.shape[0] == 1 else t for t in inputs)
    dynamic = tuple({0: Dim.AUTO} if _batched(t) else None for t in capture_inputs)
    with torch.no_grad(), preserved(model):  # export rebinds module attributes (einops' recipe caches)
        try:
            exported = torch.export.export(model, capture_inputs, dynamic_shapes=dynamic, strict=False)
            if program.dynamic_shapes_of(exported, exported.module()) is not None:
                return exported, "dynamic batch"
        except Exception:  # noqa: BLE001 - a model whose batch cannot be dynamic is captured as given
            pass
        try:
            static = torch.export.export(model, inputs, strict=False)
            return static, "static shapes: the model fixes its batch size"
        except Exception as e:  # noqa: BLE001 - reported with the user's line, as fxrep's TraceError
            export_failure = _in_user_terms(e)
    causes = f"torch.fx: {_first_line(fx_failure)}\ntorch.export: {export_failure}" if fx_failure else \
        f"torch.export: {export_failure}"
    raise TraceError(f"fxrep could not capture {type(model).__name__}.\n{causes}\nFix: make the model "
                     "exportable (torch.export.export(model, (x,)) must succeed; see the torch.export "
                     "documentation on data-dependent control flow), or capture it yourself and pass the "
                     "GraphModule or ExportedProgram to fxrep.fuse.") from None


def _batched(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] >= 1


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _in_user_terms(error: Exception) -> str:
    """``error``'s first line, with the innermost line of code outside torch that led to it."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if not f.filename.startswith(_TORCH_DIR)]
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno}: {frames[-1].line})" if frames else ""
    return f"{type(error).__name__}: {_first_line(error)}{where}"
