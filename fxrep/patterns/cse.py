"""``eliminate_common_subexpressions``: two pure nodes with the same op, target and inputs are one node.

This is how branches that share a normalization, or whose joined pre-activations became identical, end up
reading one value. ``get_attr`` nodes of one attribute and pure ``call_function``/``call_method`` nodes are
merged; random ops, in-place methods and module calls are left alone.

The duplicates are found in one pass in topological order, each node's arguments replaced by their
representatives before it is keyed: a chain of duplicates of any depth (``a1 = f(x); b1 = g(a1)`` beside
``a2 = f(x); b2 = g(a2)``) collapses in a single sweep.
"""

from __future__ import annotations

import torch
from torch import fx

from ..ir.effects import is_guard, is_inplace
from ..ir.targets import RANDOM_TARGETS
from ..pattern import Match


def _key(value, rep: dict):
    """A hashable key of an argument, with every node replaced by its representative."""
    if isinstance(value, fx.Node):
        return ("node", id(rep.get(value, value)))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_key(v, rep) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _key(v, rep)) for k, v in value.items())))
    if isinstance(value, slice):
        return ("slice", _key(value.start, rep), _key(value.stop, rep), _key(value.step, rep))
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value))
    if isinstance(value, float):
        return ("float", value.hex())
    return (type(value).__name__, value)


def _pure(node: fx.Node) -> bool:
    if node.op == "get_attr":
        return True  # same target, same tensor
    if node.op not in ("call_function", "call_method") or is_inplace(node) or is_guard(node):
        return False
    return node.op == "call_method" or node.target not in RANDOM_TARGETS


def duplicates(graph: fx.Graph, hazards: set) -> dict:
    """{duplicate node: the earlier node it equals}, in one topological pass. A node that is written in place,
    or read after such a write (``hazards``), is never merged and represents only itself."""
    first: dict = {}
    rep: dict = {}
    for n in graph.nodes:
        if not _pure(n) or n in hazards:
            continue
        try:
            key = (n.op, n.target, _key(n.args, rep), _key(n.kwargs, rep))
            hash(key)
        except TypeError:
            continue
        if key in first:
            rep[n] = first[key]
        else:
            first[key] = n
    return rep


class EliminateCommonSubexpressions:
    name = "eliminate_common_subexpressions"
    # lower: rewrites that emit one view per reader (rank-aware keys)
    phase = ("canonicalize", "fuse", "lower")

    def match(self, node, ctx):
        dup = ctx.analysis(_duplicates)
        if node in dup:
            target = node.target.__name__ if callable(node.target) else node.target
            return Match([node], dup[node], f"duplicate {target} merged")
        return None

    def replace(self, match, ctx):
        ctx.replace_node(match.nodes[0], ctx.resolve(match.data))


def _duplicates(ctx) -> dict:
    return duplicates(ctx.graph, ctx.mutation_hazards())
