"""``expand_stacked_sums``: a sum written by stacking becomes the chain of adds it is.

``torch.stack(xs, d).sum(d)``, ``.mean(d)``, ``torch.sum(torch.stack(xs), dim=d)`` and ``torch.mean(...)``
(timm's ``ParallelThingsBlock`` joins its branches this way) compute ``xs[0] + xs[1] + ...``, divided by
``len(xs)`` for a mean. As adds, the branches are visible to ``merge_affine`` and the widening patterns, like
branches summed with ``+``, ``sum(list)`` or ``functools.reduce(operator.add, ...)``. The sum is exact up to
the order of float additions (a reduction kernel may add in another order than left to right).
"""

from __future__ import annotations

import torch

from ..ir.reductions import as_reduction, as_stack
from ..pattern import Match


def _rank(node) -> int | None:
    meta = node.meta.get("tensor_meta")
    return len(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _same_axis(stack, reduction) -> bool:
    """The reduction runs over the stacked axis (negative dims need the rank, from shape propagation)."""
    if stack.dim == reduction.dim:
        return True
    rank = _rank(stack.node)
    if rank is None:
        rank = _rank(stack.tensors[0])
        rank = None if rank is None else rank + 1
    return rank is not None and stack.dim % rank == reduction.dim % rank


def _floating(node) -> bool:
    """Not known to be an integer or bool tensor (sum promotes those to int64, add does not)."""
    meta = node.meta.get("tensor_meta")
    return meta is None or not hasattr(meta, "dtype") or meta.dtype.is_floating_point


class ExpandStackedSums:
    name = "expand_stacked_sums"
    phase = "canonicalize"

    def match(self, node, ctx):
        reduction = as_reduction(node)
        stack = as_stack(reduction.input) if reduction is not None else None
        if stack is None or not _same_axis(stack, reduction) or not _floating(node):
            return None
        return Match([node], stack, f"{reduction.kind} of {len(stack.tensors)} stacked tensors -> adds")

    def replace(self, match, ctx):
        node, stack = match.nodes[0], match.data
        graph = ctx.graph
        tensors = [ctx.resolve(t) for t in stack.tensors]  # an inner stacked sum may already be adds
        with graph.inserting_before(node):
            acc = tensors[0]
            for t in tensors[1:]:
                acc = graph.call_function(torch.add, (acc, t))
            if as_reduction(node).kind == "mean":
                acc = graph.call_function(torch.div, (acc, float(len(stack.tensors))))
            elif acc is tensors[0]:
                # a one-element sum is a new tensor, not an alias
                acc = graph.call_function(torch.clone, (acc,))
        ctx.replace_node(node, acc)
