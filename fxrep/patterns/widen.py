"""Merging parallel nonlinear branches whose outputs are summed (docs/identities.md §2 and §3).

- ``widen_mlp``: ``sum_i W2_i phi(W1_i x + b1_i)`` -> ``[W2_1 .. W2_B] phi([W1_1; ..; W1_B] x + [b1_1; ..])``.
- ``collapse_attention``: attention ops on one input with bitwise-identical q/k projections (joined logits)
  share their softmax: one op whose value width per head is the sum of theirs.
- ``widen_attention``: attention ops on one input become one op over the union of their heads (q/k and v
  head widths are zero-padded to the largest; zero rows contribute exactly nothing).

All three rewrite the same way: build the merged op, then point every Linear that read branch ``i`` at the
merged op's columns for branch ``i`` (``algebra.place_columns``). ``merge_affine`` then sums those Linears.
An attention branch without an output projection, whose output ends through arithmetic alone in the node the
others end in, becomes its columns of the merged op (a ``narrow`` view, or an ``index_select``).
Preconditions, checked per group: the branches read the same input node (node identity), use the same
activation (same variant) and dtype, their pre-activation is read by nothing else, and every reader of their
output is a Linear whose result flows (through scales and sums only) into one and the same stop node.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx

from .. import algebra, cost
from ..attention.merge import collapse_heads, same_logits, widen_heads
from ..ir import (
    activation_key,
    as_linear,
    attention_view,
    const_node,
    emit_attention,
    emit_linear,
    input_of,
    known_shape,
    merge_origins,
)
from ..pattern import Match, Skip
from ..siblings import sibling_keys, sibling_near_misses


def _take_columns(graph: fx.Graph, merged: fx.Node, cols: torch.Tensor, hint: str) -> fx.Node:
    """``merged[..., cols]``: a ``narrow`` view where the columns are contiguous, else an ``index_select``."""
    start = int(cols[0])
    if torch.equal(cols, torch.arange(start, start + cols.numel())):
        return graph.call_function(torch.narrow, (merged, -1, start, cols.numel()))
    return graph.call_function(torch.index_select, (merged, -1, const_node(graph, cols, hint + "_columns")))


def _repoint_readers(ctx, branches, merged: fx.Node, columns, total: int) -> None:
    """Every Linear that read branch i now reads ``merged`` (``total`` wide) at ``columns[i]``; a branch read
    by sums (an attention without an output projection) becomes its columns of ``merged``."""
    for node, cols in zip(branches, columns):
        if any(as_linear(u) is None for u in node.users):
            with ctx.graph.inserting_before(_first(list(node.users), ctx)):
                ctx.replace_node(node, _take_columns(ctx.graph, merged, cols, node.name))
            continue
        for user in list(node.users):
            lin = as_linear(user)
            with ctx.graph.inserting_before(user):
                bias = None if lin.bias is None else lin.bias.detach().clone()
                new = emit_linear(ctx.graph, merged, algebra.place_columns(lin.weight, total, cols), bias,
                                  lin.weight.dtype, user.name, merge_origins([user]), owned=True)
            ctx.replace_node(user, new)


def _node_order(ctx) -> dict:
    return {n: i for i, n in enumerate(ctx.graph.nodes)}


def _first(nodes, ctx):
    order = ctx.analysis(_node_order)
    if any(n not in order for n in nodes):  # created in this sweep: recount
        order = {n: i for i, n in enumerate(ctx.graph.nodes)}
    return min(nodes, key=order.__getitem__)


def _out_features(node: fx.Node) -> int | None:
    """The summed width of the Linears that read ``node``; None where it is read by sums (no projection)."""
    linears = [as_linear(u) for u in node.users]
    return None if None in linears else sum(lin.out_features for lin in linears)


def _activation_name(node: fx.Node) -> str:
    """``node``'s activation as the cost key names it: ``gelu``, ``gelu(tanh)``."""
    name, variant = activation_key(node)
    return name if variant is None else f"{name}({variant})"


def _activation_fn(node: fx.Node, ctx):
    """``node``'s activation as a function of its input, for timing."""
    if node.op == "call_module":
        return ctx.gm.get_submodule(node.target)
    if node.op == "call_method":
        return lambda t: getattr(t, node.target)(*node.args[1:], **node.kwargs)
    return lambda t: node.target(t, *node.args[1:], **node.kwargs)


def _priced(found, ctx, decision):
    """The Match with its cost decision (or why it was not priced) in the summary, or a Skip where the cost
    model keeps the branches apart."""
    if not isinstance(found, Match):
        return found
    if isinstance(decision, str):  # why it was not priced
        return dataclasses.replace(found, summary=f"{found.summary} ({decision})")
    if not decision.widen:
        return Skip(found.nodes, f"widening would be slower at this shape ({decision.describe()}, input "
                                 f"{decision.key}); the branches stay apart")
    return dataclasses.replace(found, summary=f"{found.summary} ({decision.describe()})")


class WidenMLP:
    """A group pattern (``fxrep.pattern.GroupPattern``): MLP branches with one sibling key
    (``fxrep.siblings``) become one wider MLP, where the cost model says it pays."""

    name = "widen_mlp"
    phase = "fuse"

    def group_key(self, node, ctx):
        return sibling_keys(ctx, "mlp").get(node)

    def near_misses(self, ctx) -> list:
        return sibling_near_misses(ctx, "mlp")

    def match_group(self, acts, ctx):
        found = Match(acts, None, f"{len(acts)} parallel {activation_key(acts[0])[0]} MLP branches -> one "
                                  "wider MLP")
        return _priced(found, ctx, self._decision(acts, ctx))

    @staticmethod
    def _decision(acts, ctx):
        pres = [as_linear(input_of(a)) for a in acts]
        shape = known_shape(pres[0].input)
        note = cost.unpriced(ctx, shape)
        if note:
            return note
        activation = (_activation_name(acts[0]), _activation_fn(acts[0], ctx))
        return cost.decide(ctx, cost.mlp_group(shape, [p.out_features for p in pres], _out_features(acts[0]),
                                               activation, pres[0].weight.dtype))

    def replace(self, match, ctx):
        acts = list(match.nodes)
        pres = [as_linear(input_of(a)) for a in acts]
        w, b = algebra.concat_rows([p.weight for p in pres], [p.bias for p in pres])
        graph = ctx.graph
        readers = [u for a in acts for u in a.users]
        with graph.inserting_before(_first(readers, ctx)):
            pre = emit_linear(graph, pres[0].input, w, b, pres[0].weight.dtype, acts[0].name + "_wide",
                              merge_origins([p.node for p in pres]), owned=True)
            act = graph.node_copy(acts[0], lambda n: pre if n is pres[0].node else n)
        act.meta["fxrep_origin"] = merge_origins(acts)
        columns, offset = [], 0
        for p in pres:
            columns.append(torch.arange(offset, offset + p.out_features))
            offset += p.out_features
        _repoint_readers(ctx, acts, act, columns, offset)
        width = [p.out_features for p in pres]
        return {"hidden": f"{' + '.join(map(str, width))} -> {sum(width)}"}


class _MergeAttention:
    """A group pattern (``fxrep.pattern.GroupPattern``) over attention branches with one sibling key; a
    subclass says which groups merge (``match_group``) and how (``merge``: ``collapse_heads`` or
    ``widen_heads``); ``suffix`` names the merged node."""

    phase = "fuse"

    def group_key(self, node, ctx):
        return sibling_keys(ctx, "attention").get(node)

    def replace(self, match, ctx):
        atts = [attention_view(n) for n in match.nodes]
        params, heads, columns, total, masking = self.merge(atts)
        graph = ctx.graph
        readers = [u for n in match.nodes for u in n.users]
        with graph.inserting_before(_first(readers, ctx)):
            merged = emit_attention(graph, atts[0].input, params, heads, atts[0].dtype,
                                    f"{match.nodes[0].name}_{self.suffix}", merge_origins(match.nodes),
                                    # built here
                                    owned={k for k, t in params.items() if t is not getattr(atts[0], k)},
                                    **masking)
        _repoint_readers(ctx, match.nodes, merged, columns, total)
        return {"heads": heads}


class CollapseAttention(_MergeAttention):
    """Branches whose logits are joined (the same q/k) share one softmax, at any shape."""

    name, suffix = "collapse_attention", "collapse"
    merge = staticmethod(collapse_heads)

    def match_group(self, nodes, ctx):
        parts: list[list] = []
        for n in nodes:
            for part in parts:
                if same_logits(attention_view(part[0]), attention_view(n)):
                    part.append(n)
                    break
            else:
                parts.append([n])
        return [Match(p, None, f"{len(p)} attention branches with joined logits -> one attention")
                for p in parts if len(p) > 1]


class WidenAttention(_MergeAttention):
    """Parallel attention branches become one with all their heads, where the cost model says it pays."""

    name, suffix = "widen_attention", "widen"
    merge = staticmethod(widen_heads)

    def near_misses(self, ctx) -> list:
        return sibling_near_misses(ctx, "attention")

    def match_group(self, nodes, ctx):
        heads = sum(attention_view(n).num_heads for n in nodes)
        summary = f"{len(nodes)} parallel attention branches -> one attention with {heads} heads"
        return _priced(Match(nodes, None, summary), ctx, self._decision(nodes, ctx))

    @staticmethod
    def _decision(nodes, ctx):
        atts = [attention_view(n) for n in nodes]
        shape = known_shape(atts[0].input)
        note = cost.unpriced(ctx, shape)
        if note:
            return note
        branches = [(a.params(), a.num_heads, a.num_heads * a.head_widths()[2]) for a in atts]
        options = {"is_causal": atts[0].is_causal is True, "tokens_first": atts[0].tokens_first}

        widths = [_out_features(n) for n in nodes]  # None: no output projection
        out_features = widths[0] if len(set(widths)) == 1 else None

        def merge():
            params, heads, columns, total, _ = widen_heads(atts)
            return (params, heads, total) + ((columns,) if out_features is None else ())
        return cost.decide(ctx, cost.attention_group(shape, branches, merge, out_features, options,
                                                     atts[0].dtype))
