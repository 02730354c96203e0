"""Pattern registries: built-in passes and user passes are registered the same way (the pattern API itself,
``Match``, ``Skip`` and ``FuseContext``, is in ``fxrep.pattern``).

``fuse`` runs the phases in order (``canonicalize``, ``lift``, ``fuse``, ``lower``; a pattern may name a tuple
of phases to run in several); inside a phase it sweeps
the graph with every pattern of that phase, in registry order, until no pattern matches (a fixed point).
A ``Skip`` is a failed match that carries its reason; it ends up in the report.

Registries are values: ``default_registry()`` returns a fresh copy of the built-ins, ``with_pattern``,
``without`` and ``reordered`` return new registries, and ``fuse(..., patterns=...)`` takes any registry or
list of patterns. There is no process-wide state: a pattern reaches a call only through the registry passed
to it (build it once, ``MY_PATTERNS = fxrep.default_registry().with_pattern(p)``, and pass it everywhere).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .errors import PatternError
from .pattern import PHASES, FunctionPattern, FuseContext, Match, Pattern, Skip
from .patterns import builtin_patterns

__all__ = ["PHASES", "FunctionPattern", "FuseContext", "Match", "Pattern", "Skip", "PatternRegistry",
           "default_registry"]


def _check_pattern(p) -> None:
    grouping = hasattr(p, "group_key") and hasattr(p, "match_group")
    for attr in ("name", "phase", "replace") + (() if grouping else ("match",)):
        if not hasattr(p, attr):
            raise PatternError(f"{p!r} is not a pattern: it has no '{attr}'. A pattern needs name, phase, "
                               "match(node, ctx) (or, for a group pattern, group_key(node, ctx) and "
                               "match_group(nodes, ctx)) and replace(match, ctx); see fxrep.FunctionPattern.")
    phases = (p.phase,) if isinstance(p.phase, str) else tuple(p.phase)
    if not phases or any(ph not in PHASES for ph in phases):
        raise PatternError(f"pattern {p.name!r} has phase {p.phase!r}; use one of {PHASES} (or a tuple of "
                           f"them).")


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

    def with_pattern(self, pattern, *, before: str | None = None,
                     after: str | None = None) -> PatternRegistry:
        """A copy with ``pattern`` added (at the end, or before/after the named one); this one stays as it
        is."""
        out = self.copy()
        out.register(pattern, before=before, after=after)
        return out

    def without(self, *names: str) -> PatternRegistry:
        for n in names:
            self._index(n)
        return PatternRegistry(p for p in self._patterns if p.name not in names)

    def reordered(self, names: Sequence[str]) -> PatternRegistry:
        """A copy with the named patterns in this order (patterns not named keep their relative order,
        after)."""
        first = [self.get(n) for n in names]
        rest = [p for p in self._patterns if p.name not in names]
        return PatternRegistry(first + rest)

    def copy(self) -> PatternRegistry:
        return PatternRegistry(self._patterns)

    def in_phase(self, phase: str) -> list:
        return [p for p in self._patterns if p.phase == phase
                or (not isinstance(p.phase, str) and phase in p.phase)]

    def __iter__(self):
        return iter(list(self._patterns))

    def __len__(self) -> int:
        return len(self._patterns)

    def __repr__(self) -> str:
        return "PatternRegistry([" + ", ".join(f"{p.name}@{p.phase}" for p in self._patterns) + "])"


def default_registry() -> PatternRegistry:
    """A fresh registry with the built-in patterns."""
    return PatternRegistry(builtin_patterns())
