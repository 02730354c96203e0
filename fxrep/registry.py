"""The pattern API: built-in passes and user passes are written and registered the same way.

A pattern is an object with a ``name``, a ``phase`` and two methods::

    match(node, ctx)   -> Match | Skip | None     # never mutates the graph
    replace(match, ctx) -> dict | None            # rewrites the graph; may return numbers for the report

``fuse`` runs the phases in order (``canonicalize``, ``lift``, ``fuse``, ``lower``; a pattern may name a tuple of
phases to run in several); inside a phase it sweeps
the graph with every pattern of that phase, in registry order, until no pattern matches (a fixed point).
A ``Skip`` is a failed match that carries its reason; it ends up in the report.

Registries are values: ``default_registry()`` returns a fresh copy of the built-ins, and ``fuse(...,
patterns=...)`` takes any registry or list of patterns. ``register_pattern`` adds to the process-wide default
list that ``default_registry()`` copies, for users who want their pattern in every call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import fx

from .errors import PatternError
from .ir import mutation_hazards

PHASES = ("canonicalize", "lift", "fuse", "lower")


@dataclass
class Match:
    """What ``match`` found. ``nodes`` are the graph nodes the rewrite consumes (used to keep matches of one
    sweep disjoint); ``data`` is anything ``replace`` needs; ``summary`` is one line for the report."""

    nodes: Sequence[fx.Node]
    data: Any = None
    summary: str = ""
    origins: tuple = ()

    def __bool__(self) -> bool:
        return True


@dataclass
class Skip:
    """A candidate that was looked at and left alone, with the reason. Falsy, like Inductor's FailedMatch."""

    nodes: Sequence[fx.Node]
    reason: str

    def __bool__(self) -> bool:
        return False


@runtime_checkable
class Pattern(Protocol):
    name: str
    phase: str

    def match(self, node: fx.Node, ctx: FuseContext) -> Match | Skip | None: ...

    def replace(self, match: Match, ctx: FuseContext) -> dict | None: ...


class FunctionPattern:
    """A pattern made of two plain functions, for users who prefer them to a class."""

    def __init__(self, name: str, match: Callable, replace: Callable, phase: str = "fuse",
                 description: str = ""):
        self.name, self.phase, self._match, self._replace = name, phase, match, replace
        self.description = description

    def match(self, node, ctx):
        return self._match(node, ctx)

    def replace(self, match, ctx):
        return self._replace(match, ctx)

    def __repr__(self) -> str:
        return f"FunctionPattern({self.name!r}, phase={self.phase!r})"


@dataclass
class FuseContext:
    """What a pattern sees: the GraphModule being rewritten, a cache for analyses shared by the patterns of
    one sweep (dropped whenever the graph changes), a memo that outlives graph changes, and the options of
    the ``fuse`` call."""

    gm: fx.GraphModule
    options: dict = field(default_factory=dict)
    _cache: dict = field(default_factory=dict)
    _replaced: dict = field(default_factory=dict)
    _memo: dict = field(default_factory=dict)
    _fresh_replaced: list = field(default_factory=list)

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        """Compute an analysis once per graph state."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def invalidate(self) -> None:
        self._cache.clear()

    def memo(self, key: str) -> dict:
        """A dict that lives for the whole ``fuse`` call and survives graph changes, for analyses that reuse
        per-node results across sweeps. Entries must be keyed by everything they were computed from."""
        return self._memo.setdefault(key, {})

    def replace_node(self, old: fx.Node, new: fx.Node) -> None:
        """``old.replace_all_uses_with(new)``, remembered so later matches of the sweep can ``resolve`` old."""
        old.replace_all_uses_with(new)
        self._replaced[old] = new
        self._fresh_replaced.append(old)
        if "tensor_meta" in old.meta and "tensor_meta" not in new.meta:
            new.meta["tensor_meta"] = old.meta["tensor_meta"]  # same value, same shape

    def replaced_since_cleanup(self) -> list:
        """The nodes ``replace_node`` replaced since the last call (the engine erases them)."""
        out, self._fresh_replaced = self._fresh_replaced, []
        return out

    def mutation_hazards(self) -> set:
        """``ir.mutation_hazards`` of the current graph (values written in place, their aliases and readers),
        computed once per graph state: what value-based rewrites must leave alone."""
        return self.cached("mutation_hazards", lambda: mutation_hazards(self.graph))

    def resolve(self, node: fx.Node) -> fx.Node:
        while node in self._replaced:
            node = self._replaced[node]
        return node


def _check_pattern(p) -> None:
    for attr in ("name", "phase", "match", "replace"):
        if not hasattr(p, attr):
            raise PatternError(f"{p!r} is not a pattern: it has no '{attr}'. A pattern needs name, phase, "
                               "match(node, ctx) and replace(match, ctx); see fxrep.FunctionPattern.")
    phases = (p.phase,) if isinstance(p.phase, str) else tuple(p.phase)
    if not phases or any(ph not in PHASES for ph in phases):
        raise PatternError(f"pattern {p.name!r} has phase {p.phase!r}; use one of {PHASES} (or a tuple of them).")


class PatternRegistry:
    """An ordered collection of patterns with unique names."""

    def __init__(self, patterns: Iterable = ()):
        self._patterns: list = []
        for p in patterns:
            self.register(p)

    def register(self, pattern, *, before: str | None = None, after: str | None = None):
        """Add a pattern (at the end, or before/after the named one). Returns the pattern, so it can be used
        as a class decorator on an instance factory."""
        _check_pattern(pattern)
        if pattern.name in self.names():
            raise PatternError(f"a pattern named {pattern.name!r} is already registered; give the new one "
                               "another name, or unregister the old one first.")
        index = len(self._patterns)
        if before is not None:
            index = self._index(before)
        elif after is not None:
            index = self._index(after) + 1
        self._patterns.insert(index, pattern)
        return pattern

    def unregister(self, name: str) -> None:
        del self._patterns[self._index(name)]

    def _index(self, name: str) -> int:
        for i, p in enumerate(self._patterns):
            if p.name == name:
                return i
        raise PatternError(f"no pattern named {name!r}; registered: {', '.join(self.names())}")

    def names(self) -> list[str]:
        return [p.name for p in self._patterns]

    def get(self, name: str):
        return self._patterns[self._index(name)]

    def without(self, *names: str) -> PatternRegistry:
        for n in names:
            self._index(n)
        return PatternRegistry(p for p in self._patterns if p.name not in names)

    def reordered(self, names: Sequence[str]) -> PatternRegistry:
        """A copy with the named patterns in this order (patterns not named keep their relative order, after)."""
        first = [self.get(n) for n in names]
        rest = [p for p in self._patterns if p.name not in names]
        return PatternRegistry(first + rest)

    def copy(self) -> PatternRegistry:
        return PatternRegistry(self._patterns)

    def in_phase(self, phase: str) -> list:
        return [p for p in self._patterns if p.phase == phase or (not isinstance(p.phase, str) and phase in p.phase)]

    def __iter__(self):
        return iter(list(self._patterns))

    def __len__(self) -> int:
        return len(self._patterns)

    def __repr__(self) -> str:
        return "PatternRegistry([" + ", ".join(f"{p.name}@{p.phase}" for p in self._patterns) + "])"


_user_defaults: list = []


def register_pattern(pattern, *, before: str | None = None, after: str | None = None):
    """Add ``pattern`` to the patterns every ``fuse`` call uses by default. Raises PatternError if the name
    is taken. Use ``fuse(..., patterns=registry)`` instead to keep the change local to one call."""
    registry = default_registry()
    registry.register(pattern, before=before, after=after)  # validates name and position
    _user_defaults.append((pattern, before, after))
    return pattern


def unregister_pattern(name: str) -> None:
    """Remove a pattern added with ``register_pattern``."""
    for i, (p, _, _) in enumerate(_user_defaults):
        if p.name == name:
            del _user_defaults[i]
            return
    raise PatternError(f"no user pattern named {name!r} was registered with register_pattern")


def default_registry() -> PatternRegistry:
    """A fresh registry with the built-in patterns (and those added with ``register_pattern``)."""
    from .patterns import builtin_patterns

    registry = PatternRegistry(builtin_patterns())
    for p, before, after in _user_defaults:
        registry.register(p, before=before, after=after)
    return registry
