"""Pattern registries: built-in passes and user passes are registered the same way (the pattern API itself,
``Match``, ``Skip`` and ``FuseContext``, is in ``fxrep.pattern``).

``fuse`` runs the phases in order (``canonicalize``, ``lift``, ``fuse``, ``lower``; a pattern may name a tuple
of phases to run in several); inside a phase it sweeps
the graph with every pattern of that phase, in registry order, until no pattern matches (a fixed point).
A ``Skip`` is a failed match that carries its reason; it ends up in the report.

Registries are values: ``default_registry()`` returns a fresh copy of the built-ins, and ``fuse(...,
patterns=...)`` takes any registry or list of patterns. ``register_pattern`` adds to the process-wide default
list that ``default_registry()`` copies, for users who want their pattern in every call.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .errors import PatternError
from .pattern import PHASES, FunctionPattern, FuseContext, Match, Pattern, Skip
from .patterns import builtin_patterns

__all__ = ["PHASES", "FunctionPattern", "FuseContext", "Match", "Pattern", "Skip", "PatternRegistry",
           "register_pattern", "unregister_pattern", "default_registry"]


def _check_pattern(p) -> None:
    for attr in ("name", "phase", "match", "replace"):
        if not hasattr(p, attr):
            raise PatternError(f"{p!r} is not a pattern: it has no '{attr}'. A pattern needs name, phase, "
                               "match(node, ctx) and replace(match, ctx); see fxrep.FunctionPattern.")
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
    registry = PatternRegistry(builtin_patterns())
    for p, before, after in _user_defaults:
        registry.register(p, before=before, after=after)
    return registry
