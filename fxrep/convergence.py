"""Why a phase did not reach its fixed point, said so that the advice given is advice that works.

The engine records, for every sweep of a phase, the rewrites it applied and a structural fingerprint of the
graph after it. When the sweep limit is reached, three cases are told apart:

- the last sweeps leave the graph as it was (a pattern "rewrites" without changing anything, or two patterns
  undo each other within a sweep): the patterns are named;
- the graph returns to an earlier state every few sweeps: an oscillation between the named patterns;
- the graph is still changing without repeating itself: progress that needs more sweeps
  (``fxrep.fuse(..., max_sweeps=...)``).

Advice to remove a pattern is given only for patterns that are not fxrep's own: without a built-in (common
subexpressions, LayerNorm extraction, ...) the branches would no longer merge, so that is not a fix.
"""

from __future__ import annotations

from torch import fx


def fingerprint(graph: fx.Graph) -> int:
    """A hash of the graph's structure: ops, targets and argument wiring, by position rather than name (a
    rewrite that rebuilds a node under a fresh name gives the same fingerprint). Constant values are not
    part of it."""
    index = {n: i for i, n in enumerate(graph.nodes)}

    def arg(a):
        if isinstance(a, fx.Node):
            return ("%", index.get(a, -1))
        if isinstance(a, (list, tuple)):
            return tuple(arg(x) for x in a)
        if isinstance(a, dict):
            return tuple(sorted((k, arg(v)) for k, v in a.items()))
        return repr(a)

    return hash(tuple((n.op, "attr" if n.op == "get_attr" else repr(n.target), arg(n.args), arg(n.kwargs))
                      for n in graph.nodes))


def _culprits(rewrites: list) -> str:
    first = {}
    for a in rewrites:
        first.setdefault(a.pattern, a)
    counts = {p: sum(1 for a in rewrites if a.pattern == p) for p in first}
    return "; ".join(f"'{p}' ({counts[p]} rewrite(s), e.g. {a.summary} at {', '.join(a.origins[:2])})"
                     for p, a in first.items())


def not_converged_message(phase: str, max_sweeps: int, history: list, builtin: set[str]) -> str:
    """The InternalError message for a phase that was still rewriting after ``max_sweeps`` sweeps.
    ``history``: (fingerprint before the sweep, fingerprint after, rewrites applied) per sweep."""
    before, after, last = history[-1]
    names = list(dict.fromkeys(a.pattern for a in last))
    fingerprints = [h[1] for h in history]
    period = next((p for p in range(1, len(fingerprints)) if fingerprints[-1 - p] == fingerprints[-1]), None)
    if before == after:
        what = ("Every sweep ends with the graph as it began: a pattern's match must return None once its "
                "rewrite is done, and its replace must change what it matched (or these patterns undo each "
                "other within a sweep)")
    elif period is not None:
        what = f"The graph returns to the same state every {period} sweeps: these patterns undo each other"
    else:
        what = (f"The graph is still changing ({len(fingerprints)} different states) without repeating "
                f"itself: it may only need more sweeps. Fix: fxrep.fuse(..., max_sweeps={4 * max_sweeps})")
    users = [n for n in names if n not in builtin]
    if users:
        advice = ("To fuse without your pattern meanwhile: patterns=fxrep.default_registry().without("
                  + ", ".join(repr(n) for n in users) + ").")
    else:
        advice = ("Only fxrep's own patterns are involved: this is a bug in fxrep; please report it with the "
                  "model.")
    return (f"phase {phase!r} did not reach a fixed point in {max_sweeps} sweeps; still rewriting in the "
            f"last sweep: {_culprits(last)}. {what}. {advice}")
