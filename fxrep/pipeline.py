"""One ``fuse`` of a module or GraphModule (``fxrep.api``, the front door, decides what reaches it): trace or
copy, validate, run the engine (``fxrep.engine``), clean up, prune unread rows, run on the example inputs,
report, check."""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import fx, nn

from . import row_pruning
from .cost import ReplayedCostModel, cost_model_for
from .devices import CPU, cpu_twin, model_device, to_device
from .engine import run_frontend, run_patterns
from .equivalence import assert_equivalent, signature
from .errors import EquivalenceError, FxrepError, InputError, InternalError
from .pattern import FuseOptions
from .registry import PatternRegistry, default_registry
from .report import FuseReport
from .snapshot import stale_proxies
from .stats import graph_stats, run_counting_flops
from .tracing import trace_graph
from .validation import validate


def _propagate_shapes(gm: fx.GraphModule, example_inputs) -> tuple[list, int]:
    """Record every node's shape (``meta['tensor_meta']``), in the same run that counts the FLOPs of the
    graph before fusing. Returns (the outputs' shapes and dtypes, FLOPs)."""
    from torch.fx.passes.shape_prop import ShapeProp

    for t in example_inputs:
        if isinstance(t, torch.Tensor) and (t.is_quantized or not (t.is_floating_point() or t.dtype in
                                                                    (torch.int64, torch.int32, torch.bool))):
            raise InputError(f"example input of dtype {t.dtype} is not supported: pass float tensors")
    try:
        out, flops = run_counting_flops(ShapeProp(gm).propagate, example_inputs)
    except Exception as e:  # noqa: BLE001 - re-raised with the fix named
        shapes = ", ".join(str(tuple(t.shape)) for t in example_inputs if isinstance(t, torch.Tensor))
        raise InputError(f"the model does not run on the example inputs ({shapes}): {type(e).__name__}: {e}\n"
                         "Fix: pass example_inputs with the shapes and dtypes the model expects.") from e
    return signature(out), flops


def _inputs_from_shapes(model) -> tuple | None:
    """Random inputs of the traced shapes, when ``model`` is a GraphModule whose placeholders have shapes."""
    if not isinstance(model, fx.GraphModule):
        return None
    metas = [n.meta.get("tensor_meta") for n in model.graph.nodes if n.op == "placeholder"]
    if not metas or any(m is None or not hasattr(m, "shape") for m in metas):
        return None
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(tuple(m.shape), generator=g).to(m.dtype) for m in metas)


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    try:
        gm.graph.lint()
    except Exception as e:  # noqa: BLE001 - re-raised with the fix named
        stale = stale_proxies(gm)
        cause = (f" {', '.join(stale[:3]) if stale else 'A common cause'}: a model that caches values while "
                 "it is traced (timm's LeViT and EfficientFormer keep an attention_bias_cache) keeps an fx "
                 "Proxy, so a second torch.fx.symbolic_trace of it reads a node of the first trace.")
        raise InputError(
            f"the GraphModule's graph is malformed: {str(e).split('!')[0].splitlines()[0]}.{cause} Fix: pass "
            f"the nn.Module itself to fxrep.fuse "
            "(fxrep's tracer ignores and restores such caches), or trace a model that was never traced "
            "before.") from e
    graph = copy.deepcopy(gm.graph)
    new = fx.GraphModule(gm, graph, type(gm).__name__)
    new.meta = _copy_meta(getattr(gm, "meta", {}))
    return new


def _copy_meta(meta: dict) -> dict:
    """A copy of a GraphModule's meta that fusing can never change the input's through: deep where possible
    (fxrep's own entries always are), shared only for values that cannot be deep-copied."""
    out = {}
    for key, value in meta.items():
        try:
            out[key] = copy.deepcopy(value)
        except Exception:  # noqa: BLE001 - an opaque object: fxrep neither reads nor writes it
            out[key] = value
    return out


def _drop_unused_attributes(gm: fx.GraphModule) -> None:
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    own = [n for n, _ in gm.named_parameters(recurse=False)] + [n for n, _ in gm.named_buffers(recurse=False)]
    for name in own:
        if name not in used:  # fxrep's own intermediates, and constants the tracer made that were folded
            delattr(gm, name)
    gm.delete_all_unused_submodules()


def fuse(model, *, example_inputs=None, patterns=None, check: bool = False, rtol: float | None = None,
         concrete_args: dict | None = None, autotune: bool = False, decisions=None, max_sweeps: int = 50,
         prune_rows: bool = True):
    """Fuse an ``nn.Module`` (traced with torch.fx) or a GraphModule into a new GraphModule: validate, run the
    pattern phases to their fixed points, clean up, run on ``example_inputs``, report, check. The arguments
    are ``fxrep.fuse``'s (``fxrep.api``, the front door, which decides what reaches this function)."""
    if not isinstance(model, nn.Module):
        raise FxrepError(f"fxrep.fuse takes an nn.Module, a torch.fx.GraphModule or a "
                         f"torch.export.ExportedProgram, not {type(model).__name__}")
    validate(model)
    example_inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    registry = patterns if isinstance(patterns, PatternRegistry) else \
        (PatternRegistry(patterns) if patterns is not None else default_registry())
    device, user_inputs = model_device(model), example_inputs
    example_inputs = to_device(example_inputs, CPU)  # the weight algebra runs on a CPU twin (fxrep.devices)
    gm, reference, flops = _prepare(model, example_inputs, concrete_args)
    report = FuseReport(specialized=dict(gm.meta.get("fxrep_specialized", {})))
    report.before = graph_stats(gm, flops=flops)
    options = FuseOptions(device, cost_model_for(autotune, decisions), max_sweeps)
    ctx = run_patterns(gm, registry, report, options=options)
    _clean_up_graph_module(gm)
    pruned = prune_rows and example_inputs is not None and row_pruning.prune_unread_rows(gm, example_inputs,
                                                                                         report)
    if pruned:  # only the rows the outputs read: fxrep.row_pruning
        _clean_up_graph_module(gm)
    if example_inputs is not None:
        flops = _run_fused(gm, example_inputs, reference,
                           lambda: _find_breaking_pattern(model, example_inputs, concrete_args, registry,
                                                          _replaying(options, ctx.decisions)))
    report.after = graph_stats(gm, flops=flops)
    gm.meta["fxrep_report"] = report
    if device != CPU:  # a twin of the user's model: its tensors are fxrep's own and CPU copies
        gm.to(device)  # (on CPU, gm may share the user's leaf modules: Module.to re-flattens an RNN's)
    if check:
        check_equivalent(model, gm, user_inputs, rtol, report)
    return gm


def _clean_up_graph_module(gm: fx.GraphModule) -> None:
    """The attributes and submodules the fused graph no longer reads dropped; linted and recompiled."""
    _drop_unused_attributes(gm)
    gm.graph.lint()
    gm.recompile()


def trace(model: nn.Module, example_inputs=None, concrete_args: dict | None = None, *,
          recompile: bool = True) -> fx.GraphModule:
    """``torch.fx`` trace of ``model`` as ``fuse`` sees it (``fxrep.tracing``: what is fixed and what is
    restored), its guards of fixed arguments made portable (``fxrep.frontend.guards``). ``concrete_args``
    replaces the default choice: exactly the arguments named there are fixed, as in
    ``torch.fx.symbolic_trace``. Raises TraceError naming the module that failed."""
    gm = trace_graph(model, example_inputs, concrete_args)
    run_frontend(gm, gm.meta["fxrep_specialized"], aten=False)
    if recompile:
        gm.recompile()
    return gm


def _prepare(model, example_inputs, concrete_args) -> tuple:
    """fxrep's own graph of ``model`` (traced, or a copy of a GraphModule) in eval mode, with shapes from
    ``example_inputs``: (graph module, output signature or None, FLOPs or None)."""
    if isinstance(model, fx.GraphModule):
        gm = _copy_graph_module(model)
        run_frontend(gm)  # an exported (ATen) graph reads like a traced one from here on
    else:
        gm = trace(model, example_inputs, concrete_args, recompile=False)
    if model_device(gm) != CPU:
        gm = cpu_twin(gm)
    shared = {id(m) for m in model.modules()}
    for m in gm.modules():  # fxrep's own modules only: a leaf shared with the model is validated, never set
        if id(m) not in shared:
            m.training = False
    if example_inputs is None:
        return gm, None, None
    reference, flops = _propagate_shapes(gm, example_inputs)
    return gm, reference, flops


def _run_fused(gm, example_inputs, reference, locate) -> int:
    """Run the fused graph on the example inputs (counting its FLOPs, which the report needs anyway) and
    check that its outputs have the original's shapes and dtypes. A failure is fxrep's bug: raise
    InternalError naming the pattern that broke the graph (``locate()`` replays the rewrites to find it)."""
    try:
        out, flops = run_counting_flops(gm, example_inputs)
        got = signature(out)
        problem = None if got == reference else f"its outputs are {got}, the original's {reference}"
    except Exception as e:  # noqa: BLE001 - whatever the fused graph raises is reported as fxrep's bug
        problem = f"it raises {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if problem is None:
        return flops
    pattern, rewrites = locate()
    where = f"pattern '{pattern}' ({rewrites})" if pattern else "a pattern that could not be singled out"
    fix = f"fxrep.fuse(model, patterns=fxrep.default_registry().without('{pattern}'), ...)" if pattern else \
        "fxrep.fuse(model, patterns=[...]) with fewer patterns"
    raise InternalError(
        f"fxrep built a graph that does not run on the example inputs: {problem}. This is a bug in fxrep, "
        f"introduced by {where}; please report it with the model. The graph was not returned. Until it is "
        f"fixed, fuse without that pattern: {fix}.")


def _replaying(options: FuseOptions, decisions: dict) -> FuseOptions:
    """``options`` with the widen decisions made so far given back as they were (a replay times nothing)."""
    return dataclasses.replace(options, cost_model=ReplayedCostModel(decisions, options.cost_model))


def _find_breaking_pattern(model, example_inputs, concrete_args, registry, options) -> tuple[str | None, str]:
    """Replay the fuse on a fresh graph, running it after every pattern that rewrote something; return the
    first pattern after which it no longer runs (with its first rewrite), or (None, '')."""
    gm, reference, _ = _prepare(model, example_inputs, concrete_args)

    class Broke(Exception):
        pass

    def after(pattern, rewrites):
        gm.recompile()
        try:
            with torch.no_grad():
                ok = signature(gm(*example_inputs)) == reference
        except Exception:  # noqa: BLE001
            ok = False
        if not ok:
            first = rewrites[0]
            raise Broke(pattern.name, f"{len(rewrites)} rewrite(s), the first: {first.summary} at "
                                      f"{', '.join(first.origins[:3])}")

    try:
        run_patterns(gm, registry, FuseReport(), after_pattern=after, options=options)
    except Broke as b:
        return b.args
    return None, ""


def check_equivalent(model, gm, example_inputs, rtol, report) -> None:
    """``fuse(check=True)``: EquivalenceError (naming the patterns applied) where ``gm`` differs from
    ``model``."""
    if example_inputs is None:
        example_inputs = to_device(_inputs_from_shapes(model), model_device(model))
    if example_inputs is None:
        raise InputError("fuse(check=True) needs example_inputs=(tensor, ...) with the model's input "
                         "shapes (or a GraphModule whose placeholders carry shapes from ShapeProp), to "
                         "compare the fused model against the original.")
    try:
        assert_equivalent(model, gm, example_inputs, rtol=rtol)
    except EquivalenceError as e:
        raise EquivalenceError(f"{e}\nPatterns applied: {report.patterns_applied()}. If you registered "
                               "a custom pattern, its replace() is the first suspect.") from None
