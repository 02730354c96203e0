"""``eliminate_common_subexpressions``: two pure nodes with the same op, target and inputs are one node.

This is how branches that share a normalization, or whose joined pre-activations became identical, end up
reading one value. ``get_attr`` nodes of one attribute and pure ``call_function``/``call_method`` nodes are merged; random ops,
in-place methods and module calls are left alone.
"""

from __future__ import annotations

import torch
from torch import fx

from ..ir import is_guard, is_inplace
from ..ir.targets import RANDOM_TARGETS
from ..pattern import Match


def _key(value):
    if isinstance(value, fx.Node):
        return ("node", id(value))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _key(v)) for k, v in value.items())))
    if isinstance(value, slice):
        return ("slice", _key(value.start), _key(value.stop), _key(value.step))
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


class EliminateCommonSubexpressions:
    name = "eliminate_common_subexpressions"
    phase = ("canonicalize", "fuse", "lower")  # lower: rewrites that emit one view per reader (rank-aware keys)

    def _first_occurrences(self, graph):
        first: dict = {}
        dup: dict = {}
        for n in graph.nodes:
            if not _pure(n):
                continue
            try:
                key = (n.op, n.target, _key(n.args), _key(n.kwargs))
                hash(key)
            except TypeError:
                continue
            if key in first:
                dup[n] = first[key]
            else:
                first[key] = n
        return dup

    def match(self, node, ctx):
        dup = ctx.cached("cse", lambda: self._first_occurrences(ctx.graph))
        hazards = ctx.mutation_hazards()
        if node in dup and dup[node] not in hazards and node not in hazards:
            return Match([node], dup[node], f"duplicate {node.target.__name__ if callable(node.target) else node.target} merged")
        return None

    def replace(self, match, ctx):
        ctx.replace_node(match.nodes[0], ctx.resolve(match.data))
