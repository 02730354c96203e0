"""The pattern API, shared by the built-in patterns and users' own: ``Match``, ``Skip``, ``FuseContext``,
``FunctionPattern`` and the ``Pattern`` protocol. A leaf module: it imports only ``fxrep.ir``.

A pattern is an object with a ``name``, a ``phase`` and two methods::

    match(node, ctx)   -> Match | Skip | None     # never mutates the graph
    replace(match, ctx) -> dict | None            # rewrites the graph; may return numbers for the report

A group pattern merges groups of nodes (sibling branches) instead of matching at one node. It declares a key
per node and answers per group; the engine does the grouping and checks that no node of a group reads
another (``GroupPattern``)::

    group_key(node, ctx)     -> hashable | None            # nodes with equal keys may merge
    match_group(nodes, ctx)  -> Match | Skip | list | None  # the group in graph order, independent nodes
    near_misses(ctx)         -> list of Skip               # optional: candidates beside the groups
    replace(match, ctx)      -> dict | None
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import fx

from .ir.effects import mutation_hazards

PHASES = ("canonicalize", "lift", "fuse", "lower")
# the engine's own first phase (fxrep.frontend): graphs from torch.export rewritten to the readers' spellings
FRONTEND = "frontend"


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
    # reported only if the pattern still reports it in the last sweep of its phase: for candidates that other
    # rewrites of the same phase may still change (their reason names a state the graph passes through)
    provisional: bool = False

    def __bool__(self) -> bool:
        return False


class Pattern(Protocol):
    """What a pattern is (for type checkers and readers; the registry checks the attributes itself)."""

    name: str
    phase: str

    def match(self, node: fx.Node, ctx: FuseContext) -> Match | Skip | None: ...

    def replace(self, match: Match, ctx: FuseContext) -> dict | None: ...


class GroupPattern(Protocol):
    """A pattern that merges groups of nodes: the engine groups the graph's nodes by ``group_key`` (in graph
    order), drops from each group the nodes that read another of its nodes (with a Skip), and asks
    ``match_group`` for the rewrites of each group (as ``torch/_inductor/fx_passes/group_batch_fusion.py``
    does). ``near_misses`` reports candidates that no group holds."""

    name: str
    phase: str

    def group_key(self, node: fx.Node, ctx: FuseContext) -> Any: ...

    def match_group(self, nodes: list, ctx: FuseContext) -> Match | Skip | list | None: ...

    def replace(self, match: Match, ctx: FuseContext) -> dict | None: ...


class FunctionPattern:
    """A pattern made of two plain functions, for users who prefer them to a class."""

    def __init__(self, name: str, match: Callable, replace: Callable, phase: str = "fuse"):
        self.name, self.phase, self._match, self._replace = name, phase, match, replace

    def match(self, node, ctx):
        return self._match(node, ctx)

    def replace(self, match, ctx):
        return self._replace(match, ctx)

    def __repr__(self) -> str:
        return f"FunctionPattern({self.name!r}, phase={self.phase!r})"


@dataclass(frozen=True)
class FuseOptions:
    """What one ``fuse`` call was asked for, as the patterns see it.

    ``device``: where the fused model will run. ``cost_model``: decides whether widen groups merge
    (``fxrep.cost``; None until the front door fills in the default). ``max_sweeps``: how many sweeps a phase
    may take to reach its fixed point."""

    device: torch.device = torch.device("cpu")
    cost_model: Any = None
    max_sweeps: int = 50


@dataclass
class FuseContext:
    """What a pattern sees: the GraphModule being rewritten, a cache for analyses shared by the patterns of
    one sweep (dropped whenever the graph changes) and a memo that outlives graph changes.

    Patterns change the graph only through ``replace_node``, ``remove`` and new nodes; they never erase a node
    (the engine erases what was replaced or removed, after each pattern's rewrites, and dead code)."""

    gm: fx.GraphModule
    options: FuseOptions = field(default_factory=FuseOptions)
    decisions: dict = field(default_factory=dict)  # widen decisions by shape key (fxrep.cost), for the report
    _cache: dict = field(default_factory=dict)
    _replaced: dict = field(default_factory=dict)
    _memo: dict = field(default_factory=dict)
    _fresh_replaced: list = field(default_factory=list)
    _fresh_removed: list = field(default_factory=list)

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def analysis(self, fn: Callable[..., Any], *args: Hashable) -> Any:
        """``fn(self, *args)``, computed once per graph state and shared by every pattern that asks for it
        (dropped when the graph changes). The function and its arguments are the key: two patterns that
        ask for the same analysis share one result, and different analyses cannot collide."""
        key = (fn, *args)
        if key not in self._cache:
            self._cache[key] = fn(self, *args)
        return self._cache[key]

    def invalidate(self) -> None:
        self._cache.clear()

    def memo(self, owner: Hashable) -> dict:
        """A dict of ``owner``'s (the analysis function or class that uses it) that lives for the whole
        ``fuse`` call and survives graph changes, for analyses that reuse per-node results across sweeps.
        Entries must be keyed by everything they were computed from."""
        return self._memo.setdefault(owner, {})

    def replace_node(self, old: fx.Node, new: fx.Node) -> None:
        """``old.replace_all_uses_with(new)``, remembered so later matches of the sweep can ``resolve``
        old."""
        old.replace_all_uses_with(new)
        self._replaced[old] = new
        self._fresh_replaced.append(old)
        if "tensor_meta" in old.meta and "tensor_meta" not in new.meta:
            new.meta["tensor_meta"] = old.meta["tensor_meta"]  # same value, same shape

    def remove(self, node: fx.Node) -> None:
        """Ask the engine to erase ``node``, which has no readers and whose effect is moot (a check of a value
        that the rewrite keeps, say); dead-code elimination keeps such nodes, and patterns never erase."""
        self._fresh_removed.append(node)

    def removed_since_cleanup(self) -> list:
        out, self._fresh_removed = self._fresh_removed, []
        return out

    def replaced_since_cleanup(self) -> dict:
        """{node ``replace_node`` replaced since the last call: what it resolves to} (the engine erases the
        keys). The replacements are forgotten: after the engine's cleanup a replaced node is erased, or alive
        again only because a rewrite read it, and ``resolve`` must not lead to an erased node."""
        out = {n: self.resolve(n) for n in self._fresh_replaced}
        self._fresh_replaced = []
        self._replaced.clear()
        return out

    def mutation_hazards(self) -> set:
        """``ir.mutation_hazards`` of the current graph (values written in place, their aliases and readers),
        computed once per graph state: what value-based rewrites must leave alone."""
        return self.analysis(_mutation_hazards)

    def resolve(self, node: fx.Node) -> fx.Node:
        """What ``node`` was replaced by in this pattern's rewrites so far (``node`` if it was not). A
        ``replace`` that builds on nodes its ``match`` saw must resolve them: an earlier rewrite of the same
        sweep may have replaced them."""
        while node in self._replaced:
            node = self._replaced[node]
        return node


def _mutation_hazards(ctx: FuseContext) -> set:
    return mutation_hazards(ctx.graph)
