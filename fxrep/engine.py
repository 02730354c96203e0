"""The engine behind ``fxrep.fuse`` (``fxrep.api``): trace, validate, run the pattern phases to a fixed
point, clean up, report, check."""

from __future__ import annotations

import contextlib
import copy
import dataclasses

import torch
from torch import fx, nn

from . import row_pruning
from .convergence import fingerprint, not_converged_message
from .cost import ReplayedCostModel, cost_model_for
from .devices import CPU, cpu_twin, model_device, to_device
from .equivalence import assert_equivalent, signature
from .errors import (
    EquivalenceError,
    FxrepError,
    InputError,
    InternalError,
    PatternError,
)
from .ir import is_guard, is_inplace, merge_origins, torch_spellings, write_is_invisible
from .pattern import PHASES, FuseContext, FuseOptions, Match, Skip
from .patterns import builtin_patterns
from .registry import PatternRegistry, default_registry
from .report import Applied, FuseReport, Skipped
from .snapshot import stale_proxies
from .stats import graph_stats, run_counting_flops
from .tracing import portable_guards, trace_graph
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


@contextlib.contextmanager
def _erasure_refused(graph: fx.Graph, pattern):
    """While ``pattern.replace`` runs, ``graph.erase_node`` raises: the engine owns erasure (what
    ``ctx.replace_node`` replaced is erased after the pattern's rewrites, then dead code), so a rewrite can
    never leave a later match of the same sweep holding an erased node."""
    def refuse(node):
        raise PatternError(
            f"pattern {pattern.name!r} erased node '{node.name}' in replace(). Patterns must not erase "
            "nodes: call ctx.replace_node(old, new) and fxrep erases old (and any node left without users) "
            "after the pattern's rewrites.")

    graph.erase_node = refuse
    try:
        yield
    finally:
        del graph.erase_node


def _sweep(patterns, ctx: FuseContext, report: FuseReport, after_pattern=None) -> tuple[int, list]:
    """Run each pattern once over the graph; return (rewrites applied, skips seen). ``after_pattern(pattern,
    rewrites)`` is called after each pattern that rewrote something (used to find a pattern that broke it)."""
    applied = 0
    skips: list = []
    for pattern in patterns:
        matches = []
        taken: set = set()
        hazards = ctx.mutation_hazards()
        for node in list(ctx.graph.nodes):  # match() never mutates: the list stays valid
            result = pattern.match(node, ctx)
            if isinstance(result, Skip):
                skips.append((Skipped(pattern.name, result.reason, merge_origins(result.nodes)),
                              result.provisional))
            elif isinstance(result, Match):
                if not hazards.isdisjoint(result.nodes):
                    reason = ("a value it rewrites is written in place (or read after such a write): left as "
                              "it is")
                    skips.append((Skipped(pattern.name, reason, merge_origins(result.nodes)), False))
                elif taken.isdisjoint(result.nodes):
                    matches.append(result)
                    taken.update(result.nodes)
            elif result is not None:
                raise FxrepError(f"pattern {pattern.name!r}: match() returned {type(result).__name__}; "
                                 "return a fxrep.Match, a fxrep.Skip or None")
        for m in matches:
            origins = tuple(m.origins) or merge_origins(m.nodes)
            with _erasure_refused(ctx.graph, pattern):
                details = pattern.replace(m, ctx) or {}
            report.applied.append(Applied(pattern.name, m.summary, origins, dict(details)))
            applied += 1
        if matches:
            _cleanup(ctx, pattern)
            if after_pattern is not None:
                after_pattern(pattern, report.applied[-len(matches):])
    return applied, skips


def _cleanup(ctx: FuseContext, pattern) -> None:
    """Erase what the rewrites replaced (``ctx.replace_node``; an in-place or impure node a pattern replaced
    is its responsibility, and dead-code elimination would keep it), then dead code."""
    graph = ctx.graph
    replaced = {n: new for n, new in ctx.replaced_since_cleanup().items() if n.graph is graph}
    _redirect_stale_reads(graph, {n: new for n, new in replaced.items() if n.users}, pattern)
    for node in reversed(graph.nodes):
        if node in replaced and not node.users:
            graph.erase_node(node)
    _eliminate_dead_code(graph)
    ctx.invalidate()


def _redirect_stale_reads(graph: fx.Graph, stale: dict, pattern) -> None:
    """A replaced node that has readers again was read by a later rewrite of the same pattern that built on
    what its ``match`` saw (``ctx.resolve`` is the fix in the pattern). ``replace_node(old, new)`` states that
    both are the same value, so reading ``new`` instead is exact, where ``new`` comes before the reader;
    otherwise the graph cannot be repaired and the pattern is named."""
    if not stale:
        return
    order = {n: i for i, n in enumerate(graph.nodes)}
    for old, new in stale.items():
        for user in list(old.users):
            if new not in order or order[new] >= order[user]:
                raise InternalError(
                    f"pattern {getattr(pattern, 'name', pattern)!r} read {old.name}, which one of its own "
                    f"rewrites had replaced by {new.name}, in {user.name} (a node it builds must read "
                    "ctx.resolve(node) for the nodes its match() saw); please report this")
            user.replace_input_with(old, new)


def _eliminate_dead_code(graph: fx.Graph) -> None:
    """``Graph.eliminate_dead_code`` without its lint and with the purity check only for unused nodes
    (fast on large graphs; run_patterns lints once per phase). Also kept: guards, and in-place ops, whose
    result nobody reads but whose write others may (fx's ``is_impure`` does not know ``x.mul_(2)``), unless
    the written value owns its memory and has no other reader (``ir.write_is_invisible``)."""
    for node in reversed(graph.nodes):
        if node.users or node.is_impure() or is_guard(node):
            continue
        if not is_inplace(node) or write_is_invisible(node):  # a write nobody reads is dead too
            graph.erase_node(node)


def _drop_unused_attributes(gm: fx.GraphModule) -> None:
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    own = [n for n, _ in gm.named_parameters(recurse=False)] + [n for n, _ in gm.named_buffers(recurse=False)]
    for name in own:
        if name not in used:  # fxrep's own intermediates, and constants the tracer made that were folded
            delattr(gm, name)
    gm.delete_all_unused_submodules()


def run_patterns(gm: fx.GraphModule, registry: PatternRegistry, report: FuseReport, after_pattern=None,
                 options: FuseOptions | None = None) -> FuseContext:
    """Run every phase of ``registry`` on ``gm`` in place (gm must be fxrep's own copy); returns the context.

    Skips are collected from every sweep (provisional ones from the phase's last sweep only); one is dropped
    when the same pattern later rewrote everything it names (a candidate that became mergeable after another
    rewrite is not a near miss; one that shares only a LayerNorm with a rewrite still is)."""
    ctx = FuseContext(gm, options or FuseOptions(cost_model=cost_model_for()))
    _eliminate_dead_code(gm.graph)  # dead code (a dead in-place write, say) must not block the first phase
    skips: dict = {}
    for phase in PHASES:
        patterns = registry.in_phase(phase)
        if patterns:
            _run_phase(phase, patterns, ctx, report, after_pattern, skips)
    done: dict = {}
    for a in report.applied:
        done.setdefault(a.pattern, set()).update(a.origins)
    report.skipped += [s for s in skips.values() if not set(s.origins) <= done.get(s.pattern, set())]
    report.decisions.update(ctx.decisions)
    report.cost_model = ctx.options.cost_model.describe() if ctx.options.cost_model is not None else ""
    return ctx


def _run_phase(phase: str, patterns: list, ctx: FuseContext, report: FuseReport, after_pattern, skips: dict):
    """Sweep until a sweep applies nothing (the fixed point; the graph is linted there), or raise
    InternalError with what still changes (``fxrep.convergence``)."""
    history: list = []
    state = fingerprint(ctx.graph)
    first_rewrite = len(report.applied)
    for _ in range(ctx.options.max_sweeps):
        report.sweeps += 1
        applied, seen = _sweep(patterns, ctx, report, after_pattern)
        for s, provisional in seen:
            if not provisional or not applied:  # provisional: only as the phase's last sweep sees it
                skips.setdefault((s.pattern, s.reason, s.origins), s)
        if not applied:
            _lint(ctx.graph, phase, report.applied[first_rewrite:])
            return
        before, state = state, fingerprint(ctx.graph)
        history.append((before, state, report.applied[-applied:]))
    builtin = {p.name for p in builtin_patterns()}
    raise InternalError(not_converged_message(phase, ctx.options.max_sweeps, history, builtin))


def _lint(graph: fx.Graph, phase: str, rewrites: list) -> None:
    """A pattern that broke the graph (a node read before it is defined, say) is caught at the end of its
    phase and reported as fxrep's bug, with the patterns that rewrote in that phase."""
    try:
        graph.lint()
    except RuntimeError as e:
        names = sorted({a.pattern for a in rewrites})
        raise InternalError(
            f"the graph is malformed after the {phase!r} phase ({str(e).splitlines()[0]}); patterns that "
            f"rewrote in it: {', '.join(names) or 'none'}. This is a bug in fxrep or in one of those "
            "patterns; please report it with the model. Until it is fixed, fuse without the pattern: "
            "fxrep.fuse(model, patterns=fxrep.default_registry().without(...))") from None


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


def _prepare(model, example_inputs, concrete_args) -> tuple:
    """fxrep's own graph of ``model`` (traced, or a copy of a GraphModule) in eval mode, with shapes from
    ``example_inputs``: (graph module, output signature or None, FLOPs or None)."""
    if isinstance(model, fx.GraphModule):
        gm = _copy_graph_module(model)
        torch_spellings(gm)  # an exported (ATen) graph reads like a traced one from here on
        portable_guards(gm, recompile=False)
    else:
        gm = trace_graph(model, example_inputs, concrete_args)
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
