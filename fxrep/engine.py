"""The engine: runs patterns. One phase at a time (the front end, then the registry's phases in order), each
pattern sweeping the graph, until a sweep rewrites nothing (the phase's fixed point; the graph is linted
there). It alone erases nodes: what a pattern replaced or removed, then dead code. ``fxrep.pipeline`` is what
one ``fuse`` of a graph does around it."""

from __future__ import annotations

import contextlib

from torch import fx

from .convergence import fingerprint, not_converged_message
from .cost import cost_model_for
from .errors import FxrepError, InternalError, PatternError
from .frontend import frontend_patterns
from .ir import merge_origins
from .ir.effects import is_guard, is_inplace, write_is_invisible
from .pattern import FRONTEND, PHASES, FuseContext, FuseOptions, Match, Skip
from .patterns import builtin_patterns
from .registry import PatternRegistry
from .report import Applied, FuseReport, Skipped


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
        for result in _results(pattern, ctx):  # match() never mutates: the graph stays as it is
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


def _results(pattern, ctx: FuseContext):
    """What ``pattern`` finds in the graph, in graph order: ``match`` at every node, or, for a group pattern,
    ``match_group`` for every group (``_group_results``)."""
    if hasattr(pattern, "group_key"):
        return _group_results(pattern, ctx)
    return (pattern.match(node, ctx) for node in list(ctx.graph.nodes))


def _group_results(pattern, ctx: FuseContext) -> list:
    """The nodes grouped by ``pattern.group_key`` (graph order within a group); each group's nodes that read
    another of its nodes left out with a Skip (a merged op cannot compute its own input); ``match_group`` of
    the rest, and ``near_misses``: all in the graph order of their first node."""
    order = {n: i for i, n in enumerate(ctx.graph.nodes)}
    groups: dict = {}
    for node in order:
        key = pattern.group_key(node, ctx)
        if key is not None:
            groups.setdefault(key, []).append(node)
    found = list(getattr(pattern, "near_misses", lambda ctx: [])(ctx))
    for nodes in groups.values():
        kept, dependent = _independent(nodes, order)
        if dependent:
            found.append(Skip(dependent, "reads the output of another node of its group, so it cannot be "
                                         "merged with it"))
        result = pattern.match_group(kept, ctx)
        found += result if isinstance(result, list) else [] if result is None else [result]
    return sorted(found, key=lambda r: order[r.nodes[0]])


def _independent(nodes: list, order: dict) -> tuple[list, list]:
    """(nodes that read no earlier kept node of the group, the others), walking inputs back only as far as
    the group's first node."""
    kept: list = []
    dependent: list = []
    for node in nodes:
        targets, floor = set(kept), order[kept[0]] if kept else 0
        stack, seen, reaches = list(node.all_input_nodes), set(), False
        while stack and targets and not reaches:
            n = stack.pop()
            reaches = n in targets
            if n not in seen and order.get(n, -1) > floor:
                seen.add(n)
                stack.extend(n.all_input_nodes)
        (dependent if reaches else kept).append(node)
    return kept, dependent


def _cleanup(ctx: FuseContext, pattern) -> None:
    """Erase what the rewrites replaced (``ctx.replace_node``; an in-place or impure node a pattern replaced
    is its responsibility, and dead-code elimination would keep it), then dead code."""
    graph = ctx.graph
    replaced = _rewritten(ctx, pattern)
    for node in reversed(graph.nodes):
        if node in replaced and not node.users:
            graph.erase_node(node)
    _eliminate_dead_code(graph)
    ctx.invalidate()


def _rewritten(ctx: FuseContext, pattern) -> set:
    """The nodes of this graph the rewrites since the last cleanup replaced or removed, with every read of a
    replaced node that is still left pointed at its replacement."""
    graph = ctx.graph
    replaced = {n: new for n, new in ctx.replaced_since_cleanup().items() if n.graph is graph}
    _redirect_stale_reads(graph, {n: new for n, new in replaced.items() if n.users}, pattern)
    return set(replaced) | {n for n in ctx.removed_since_cleanup() if n.graph is graph}


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
        if not node.users and _is_dead(node):
            graph.erase_node(node)


def _is_dead(node: fx.Node) -> bool:
    """Whether ``node``, which nobody reads, may go: not impure, not a guard, and not an in-place write that
    others may see (a write nobody reads is dead too)."""
    if node.is_impure() or is_guard(node):
        return False
    return not is_inplace(node) or write_is_invisible(node)


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


def run_frontend(gm: fx.GraphModule, specialized: dict | None = None, aten: bool = True) -> FuseReport:
    """Run the front-end phase (``fxrep.frontend.frontend_patterns``: ATen graphs in the readers' spellings,
    portable guards) on ``gm`` (fxrep's own graph) to its fixed point; returns its own report (the front end
    rewrites nothing a user asked for)."""
    return run_pass(gm, frontend_patterns(specialized, aten), FRONTEND)


def run_pass(gm: fx.GraphModule, patterns, phase: str) -> FuseReport:
    """Run ``patterns`` on ``gm`` (a graph fxrep owns) as one phase named ``phase``, to its fixed point, on
    the contract of every pattern: the front end, and the deployment rewrites of ``fxrep.export``. Returns
    the phase's report (``report.applied``: what was rewritten)."""
    report = FuseReport()
    _run_phase(phase, list(patterns), FuseContext(gm), report, None, {})
    return report


_TRACKED_SWEEPS = 10  # sweeps before the limit whose fingerprints tell progress from oscillation


def _run_phase(phase: str, patterns: list, ctx: FuseContext, report: FuseReport, after_pattern, skips: dict):
    """Sweep until a sweep applies nothing (the fixed point; the graph is linted there), or raise
    InternalError with what still changes (``fxrep.convergence``). The graph is fingerprinted only in the
    last sweeps before the limit, which are all the message reads: a phase that converges pays nothing."""
    history: list = []
    state = None
    first_rewrite = len(report.applied)
    track_from = max(0, ctx.options.max_sweeps - _TRACKED_SWEEPS)
    for sweep in range(ctx.options.max_sweeps):
        if sweep >= track_from and state is None:
            state = fingerprint(ctx.graph)
        report.sweeps += 1
        applied, seen = _sweep(patterns, ctx, report, after_pattern)
        for s, provisional in seen:
            if not provisional or not applied:  # provisional: only as the phase's last sweep sees it
                skips.setdefault((s.pattern, s.reason, s.origins), s)
        if not applied:
            _lint(ctx.graph, phase, report.applied[first_rewrite:])
            return
        if state is not None:
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


def run_upward(gm: fx.GraphModule, patterns, phase: str, before_pass=None,
               max_passes: int = 50) -> FuseReport:
    """Run ``patterns`` on ``gm`` from its outputs up: each match is rewritten at once, so the next sees the
    graph as the rewrites before it left it, and the nodes a rewrite made are visited next. Passes repeat
    (``before_pass(gm)`` first: shapes, say) until one rewrites nothing.

    For rewrites that move work up the graph (row pruning): a move creates work only on the moved op's
    inputs, visited later in the pass, and on the nodes it made, visited next. So one pass is linear in graph
    size, and a second confirms the fixed point. The contract is every pattern's: ``match`` never mutates,
    ``replace`` never erases; the engine erases what was replaced or removed and what that leaves dead."""
    report = FuseReport()
    for _ in range(max_passes):
        if before_pass is not None:
            before_pass(gm)
        if not _upward_pass(gm, patterns, report):
            _lint(gm.graph, phase, report.applied)
            return report
    raise InternalError(f"the {phase!r} phase did not reach a fixed point in {max_passes} passes; this is a "
                        "bug in fxrep, please report it with the model")


def _upward_pass(gm: fx.GraphModule, patterns, report: FuseReport) -> int:
    ctx, made = FuseContext(gm), []
    hazards = ctx.mutation_hazards()  # moves write nothing in place: the hazards stay what they were
    gm._register_create_node_hook(made.append)
    try:
        pending, gone, rewrote = list(gm.graph.nodes), set(), 0
        while pending:
            node = pending.pop()
            if node in gone:
                continue
            for pattern in patterns:
                found = pattern.match(node, ctx)
                if not isinstance(found, Match) or not hazards.isdisjoint(found.nodes):
                    continue
                made.clear()
                with _erasure_refused(gm.graph, pattern):
                    details = pattern.replace(found, ctx) or {}
                origins = tuple(found.origins) or merge_origins(found.nodes)
                report.applied.append(Applied(pattern.name, found.summary, origins, dict(details)))
                gone |= _erase_rewritten(ctx, pattern)
                pending.extend(n for n in made if n not in gone)
                rewrote += 1
                break
    finally:
        gm._unregister_create_node_hook(made.append)
    return rewrote


def _erase_rewritten(ctx: FuseContext, pattern) -> set:
    """Erase what one rewrite replaced or removed, then what that leaves dead, looking only at those nodes
    and their inputs (a whole-graph sweep per rewrite would make a pass quadratic). Returns the erased."""
    graph = ctx.graph
    explicit = _rewritten(ctx, pattern)
    gone: set = set()
    stack = list(explicit)
    while stack:
        node = stack.pop()
        if node in gone or node.users:
            continue
        if node not in explicit and not _is_dead(node):
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        gone.add(node)
        stack.extend(inputs)
    ctx.invalidate()
    return gone
