"""Canonicalize phase: rearrangements of rows moved to where they do not hide a Linear or a sum
(docs/identities.md §9).

- ``unflatten_linear_rows``: ``linear(y.reshape(N, E)).view(*S, O)`` with ``prod(S) == N`` is
  ``linear(y.reshape(*S, E))``. A Linear acts on each row alone, so flattening the rows before it and
  splitting them after it is the same as splitting them before it. ``torch.export`` writes
  ``nn.MultiheadAttention``'s output projection this way; afterwards the projection reads the attention
  output in its (tokens, batch) layout, which the attention lift knows.
- ``permutes_out_of_sums``: ``P(a) + P(b)`` (or ``-``; or ``P(a) + 0``, how Python's ``sum`` starts) is
  ``P(a + b)`` for one permutation ``P`` of the axes of tensors of one rank: broadcasting and the
  elementwise op commute with permuting every operand alike. Branches whose outputs are each transposed back
  before they are summed (exported ``nn.MultiheadAttention`` with ``batch_first=True``) become a sum of
  Linears that the widening patterns see. A permute that ``cancel_permutes`` removes is left to it: moving
  it out of the sum would part it from what it cancels with.
- ``cancel_permutes``: ``x.permute(p).permute(q)`` where ``q`` undoes ``p`` is ``x``, and so is
  ``linear(x.permute(p)).permute(q)`` with ``p`` and ``q`` keeping the last axis ``linear(x)``. The
  lowering of a tokens-first attention transposes its input and output; these cancel the transposes around
  it. Permutes that do not cancel are left as written.

Every rewrite is exact: the same values are computed for every row, in the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from ..ir import arith_kind, as_linear
from ..ir.effects import is_inplace
from ..ir.layout import as_permute, as_reshape, rank
from ..ir.readers import is_shape_read
from ..pattern import Match


def _readers(node: fx.Node) -> list:
    return [u for u in node.users if not is_shape_read(u)]


class UnflattenLinearRows:
    name = "unflatten_linear_rows"
    phase = "canonicalize"

    def match(self, node, ctx):
        after = as_reshape(node)
        lin = as_linear(after.input) if after is not None else None
        before = as_reshape(lin.input) if lin is not None else None
        if before is None or _readers(lin.node) != [node] or len(after.shape) < 2:
            return None
        out_features, in_features = lin.weight.shape
        if after.shape[-1] != out_features or before.shape[-1] != in_features or \
                isinstance(after.shape[-1], fx.Node) or isinstance(before.shape[-1], fx.Node):
            return None
        if {node, lin.node, before.node} & ctx.mutation_hazards():
            return None
        return Match([node, lin.node], (lin, before, tuple(after.shape[:-1])),
                     "rows flattened around a Linear -> split before it")

    def replace(self, match, ctx):
        node = match.nodes[0]
        lin, before, rows = match.data
        graph = ctx.graph
        with graph.inserting_before(node):
            x = graph.call_function(torch.reshape, (ctx.resolve(before.input), [*rows, lin.weight.shape[1]]))
            new = graph.call_function(F.linear, (x, lin.weight_node, lin.bias_node))
        ctx.replace_node(node, new)


def _operands(node: fx.Node):
    """(permutation, operands as (input of the permute | 0)) if ``node`` adds or subtracts tensors that are
    the same permutation of tensors of one rank (or a permuted tensor and the literal 0), else None."""
    if arith_kind(node) not in ("add", "sub") or node.kwargs or len(node.args) != 2:
        return None
    perm, out = None, []
    for a in node.args:
        if not isinstance(a, fx.Node) and a == 0 and not isinstance(a, bool):
            out.append(a)
            continue
        p = as_permute(a)
        if p is None or (perm is not None and p.perm != perm) or rank(p.input) != len(p.perm):
            return None
        perm = p.perm
        out.append(p.input)
    return (perm, out) if perm is not None else None


class PermutesOutOfSums:
    name = "permutes_out_of_sums"
    phase = "canonicalize"

    def match(self, node, ctx):
        found = _operands(node)
        if found is None or node in ctx.mutation_hazards():
            return None
        if any(_CANCEL.match(a, ctx) is not None for a in node.args if isinstance(a, fx.Node)):
            return None  # a permute that cancels goes first: moving it would hide what it cancels with
        if any(is_inplace(u) or (u.op == "call_method" and u.target == "view") for u in node.users):
            return None  # the result's strides may differ: keep what a stride-sensitive reader sees
        what = "sum" if arith_kind(node) == "add" else "difference"
        return Match([node], found, f"the same permute of every term of a {what} -> after it")

    def replace(self, match, ctx):
        node = match.nodes[0]
        perm, operands = match.data
        graph = ctx.graph
        with graph.inserting_before(node):
            args = tuple(ctx.resolve(a) if isinstance(a, fx.Node) else a for a in operands)
            inner = graph.create_node(node.op, node.target, args, {})
            new = graph.call_function(torch.permute, (inner, list(perm)))
        ctx.replace_node(node, new)


def _compose(inner: tuple, outer: tuple) -> tuple:
    """The permutation of ``x.permute(inner).permute(outer)``."""
    return tuple(inner[i] for i in outer)


class CancelPermutes:
    name = "cancel_permutes"
    phase = ("canonicalize", "lower")

    def match(self, node, ctx):
        outer = as_permute(node)
        if outer is None:
            return None
        r = len(outer.perm)  # a permute and a Linear keep the rank
        inner = as_permute(outer.input, r)
        lin = None
        if inner is None:
            lin = as_linear(outer.input)
            inner = as_permute(lin.input, r) if lin is not None else None
            if inner is None or _readers(lin.node) != [node] or not (inner.keeps_last_axis and
                                                                     outer.keeps_last_axis):
                return None
        if len(inner.perm) != len(outer.perm) or {node, inner.node} & ctx.mutation_hazards():
            return None
        if _compose(inner.perm, outer.perm) != tuple(range(len(outer.perm))):
            return None
        if lin is None and any(u.op == "output" for u in node.users):
            return None  # the caller gets a view of x, as written, not x itself
        return Match([node], (inner.input, lin), "permutes cancel" + (" around a Linear" if lin else ""))

    def replace(self, match, ctx):
        node = match.nodes[0]
        x, lin = match.data
        new = ctx.resolve(x)
        if lin is not None:
            with ctx.graph.inserting_before(node):
                new = ctx.graph.call_function(F.linear, (new, lin.weight_node, lin.bias_node))
        ctx.replace_node(node, new)


_CANCEL = CancelPermutes()
