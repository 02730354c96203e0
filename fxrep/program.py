"""``fxrep.fuse`` for ``torch.export`` programs: ExportedProgram in, ExportedProgram out.

The program is unlifted (``ep.module()``: parameters become attributes, its pytree calling convention is
kept), its ATen graph is fused by the engine like any GraphModule (``fxrep.frontend`` rewrites ATen spellings
to the torch-level ones the readers know), and the fused GraphModule is exported again with the program's
dynamic batch dimension. The input program is never modified.
"""

from __future__ import annotations

import inspect

import torch
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import InputKind
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.utils import _pytree as pytree

from . import pipeline
from .equivalence import compare_outputs
from .errors import InputError, InternalError, TrainingModeError, UnsupportedModelError
from .ir import bind
from .snapshot import preserved
from .validation import training_modules


def fuse_program(ep: ExportedProgram, *, example_inputs=None, patterns=None, check: bool = False,
                 rtol: float | None = None, **options) -> ExportedProgram:
    """Fuse an ExportedProgram; return a new one with the same calling convention (inputs and outputs as
    pytrees, a dynamic batch dimension stays dynamic). ``example_inputs`` (a tuple of positional arguments)
    default to the program's own; the report is ``fused.graph_module.meta["fxrep_report"]``. ``options``
    (``autotune``, ``decisions``, ``max_sweeps``) are ``fxrep.fuse``'s."""
    _check_program(ep)
    module = ep.module()
    args = _positional(module, ep, example_inputs)
    gm = pipeline.fuse(module, example_inputs=args, patterns=patterns, check=check, rtol=rtol, **options)
    report = gm.meta["fxrep_report"]
    try:
        fused = torch.export.export(gm, args, dynamic_shapes=dynamic_shapes_of(ep, module), strict=False)
    except Exception as e:  # noqa: BLE001 - the graph fxrep built does not export: fxrep's bug
        raise InternalError(
            f"the fused graph does not export again ({type(e).__name__}: {str(e).splitlines()[0][:300]}). "
            "This is a bug in fxrep; please report it with the model. fxrep.fuse(program.module()) returns "
            "the fused GraphModule meanwhile.") from e
    fused.graph_module.meta["fxrep_report"] = report
    return fused


def as_program(model, example_inputs) -> ExportedProgram:
    """``model`` as an ExportedProgram: a program as it is, a module exported without gradients. The module is
    not switched to eval mode (fxrep never changes the caller's model): one in training mode is refused."""
    if isinstance(model, ExportedProgram):
        return model
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"expected an nn.Module, a GraphModule or an ExportedProgram, not "
                         f"{type(model).__name__}")
    training = training_modules(model)
    if training:
        raise TrainingModeError(f"the model is in training mode (e.g. {', '.join(training[:3])}): call "
                                "model.eval() before exporting it.")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    with torch.no_grad(), preserved(model):  # export rebinds module attributes; the caller's stay as they are
        return torch.export.export(model, inputs)


def _check_program(ep: ExportedProgram) -> None:
    training = _training_ops(ep)
    if training:
        raise TrainingModeError(
            f"the program was exported in training mode ({', '.join(training[:3])}): BatchNorm updates its "
            "running statistics and Dropout is random there, so no rewrite is exact. Export the model after "
            "model.eval().")
    for name, value in _user_input_values(ep):
        if isinstance(value, torch.Tensor):
            dynamic = [i for i in _symbolic_dims(value) if i != 0]
            if dynamic:
                raise UnsupportedModelError(
                    f"input '{name}' has dynamic dimension(s) {dynamic}: fxrep reasons about a dynamic batch "
                    "dimension (dim 0) only. Export with the other dimensions static (leave them out of "
                    "dynamic_shapes).")


def _training_ops(ep: ExportedProgram) -> list[str]:
    """What makes the program a training program: buffers it writes (in the signature, or in place in a
    training-IR graph) and ops called with their training flag set."""
    state = {s.arg.name: s.target for s in ep.graph_signature.input_specs
             if s.kind in (InputKind.PARAMETER, InputKind.BUFFER)}
    found = [f"writes {name}" for name in ep.graph_signature.buffers_to_mutate.values()]
    for n in ep.graph.nodes:
        if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
            continue
        schema, args = n.target._schema, bind(n) or {}
        written = [a for a, arg in zip(n.args, schema.arguments)
                   if arg.alias_info is not None and arg.alias_info.is_write
                   and getattr(a, "name", None) in state]
        found += [f"{n.name} writes {state[a.name]}" for a in written]
        # a batch_norm in training mode without running statistics only normalizes (timm's weight
        # standardization), and a dropout with p = 0 is the identity: neither is training
        stats = args.get("running_mean") is not None or args.get("running_var") is not None
        if (args.get("training") is True and stats) or (args.get("train") is True and args.get("p", 0) != 0):
            found.append(f"{n.name} in training mode")
    return found


def _user_input_values(ep: ExportedProgram) -> list:
    """(name, fake value) of every user input, in the order of the program's input pytree leaves."""
    values = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    return [(s.arg.name, values.get(s.arg.name)) for s in ep.graph_signature.input_specs
            if s.kind == InputKind.USER_INPUT]


def _positional(module, ep: ExportedProgram, example_inputs) -> tuple:
    if example_inputs is None:
        if ep.example_inputs is None:
            raise InputError("the program keeps no example inputs: pass example_inputs=(x,) to fxrep.fuse.")
        args, kwargs = ep.example_inputs
    else:
        single = isinstance(example_inputs, torch.Tensor)
        args, kwargs = (example_inputs,) if single else tuple(example_inputs), {}
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    if bound.kwargs:
        raise UnsupportedModelError(
            f"the program takes keyword-only inputs ({', '.join(bound.kwargs)}); fxrep fuses programs whose "
            "inputs can be passed by position.")
    return tuple(bound.args)


def export_rewritten(program: ExportedProgram, module: torch.nn.Module, example_inputs: tuple, *,
                     rewrite: str,
                     switch: str, tolerance: float | None = None) -> ExportedProgram:
    """``module``, a rewritten ``program.module()``, exported again with the program's dynamic dimensions and
    checked to compute what ``program`` computes on ``example_inputs`` (``tolerance`` relative; by default
    ``numerics.MODEL_RTOL`` for the outputs' dtype). A module that does not export, or computes something
    else, is fxrep's bug: InternalError naming ``rewrite`` and the ``switch`` that turns it off."""
    try:
        with torch.no_grad():
            rewritten = torch.export.export(module, example_inputs,
                                            dynamic_shapes=dynamic_shapes_of(program, module),
                                            strict=False)
            compare_outputs(program.module()(*example_inputs), rewritten.module()(*example_inputs), tolerance)
    except Exception as e:  # noqa: BLE001 - a graph fxrep built that does not export or computes otherwise
        raise InternalError(f"{rewrite} broke the program ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:300]}). This is a bug in fxrep; please report it with "
                            f"the model, and pass {switch} "
                            "meanwhile.") from e
    return rewritten


def dynamic_shapes_of(ep: ExportedProgram, module):
    """The program's dynamic dimensions, keyed by ``forward``'s argument names, or None if all are static."""
    leaves = [({i: Dim.DYNAMIC for i in _symbolic_dims(v)} or None) if isinstance(v, torch.Tensor) else None
              for _, v in _user_input_values(ep)]
    if all(leaf is None for leaf in leaves):
        return None
    args, kwargs = pytree.tree_unflatten(leaves, ep.call_spec.in_spec)
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    return dict(bound.arguments)


def _symbolic_dims(value: torch.Tensor) -> list[int]:
    """The dimensions of a fake tensor that stay symbolic (a SymInt that export specialized to a constant, a
    batch the model asserts, say, is static)."""
    return [i for i, s in enumerate(value.shape) if isinstance(s, torch.SymInt) and not is_concrete_int(s)]
