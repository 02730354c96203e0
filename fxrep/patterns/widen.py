"""Merging parallel nonlinear branches whose outputs are summed (docs/identities.md §2 and §3).

- ``widen_mlp``: ``sum_i W2_i phi(W1_i x + b1_i)`` -> ``[W2_1 .. W2_B] phi([W1_1; ..; W1_B] x + [b1_1; ..])``.
- ``collapse_attention``: attention ops on one input with bitwise-identical q/k projections (joined logits)
  share their softmax: one op whose value width per head is the sum of theirs.
- ``widen_attention``: attention ops on one input become one op over the union of their heads (q/k and v
  head widths are zero-padded to the largest; zero rows contribute exactly nothing).

All three rewrite the same way: build the merged op, then point every Linear that read branch ``i`` at the
merged op's columns for branch ``i`` (``algebra.place_columns``). ``merge_affine`` then sums those Linears.
Preconditions, checked per group: the branches read the same input node (node identity), use the same
activation (same variant) and dtype, their pre-activation is read by nothing else, and every reader of their
output is a Linear whose result flows (through scales and sums only) into one and the same stop node.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx

from .. import algebra, cost
from ..affine import AffineAnalysis, affine_analysis
from ..attention.merge import merge_heads, same_logits
from ..ir import (
    activation_key,
    arith_kind,
    as_layer_norm,
    as_linear,
    attention_view,
    emit_attention,
    emit_linear,
    known_shape,
    merge_origins,
)
from ..pattern import Match, Skip


def _owner(node: fx.Node, analysis: AffineAnalysis):
    """The single stop node all Linear readers of ``node`` flow into, or None."""
    owners = set()
    for u in node.users:
        lin = as_linear(u)
        if lin is None or lin.input is not node or u not in analysis.owner:
            return None
        owners |= analysis.owner[u]
    return next(iter(owners)) if len(owners) == 1 else None


def _describe_unowned(kind: str) -> str:
    what = "attention branches" if kind == "attention" else "MLP branches"
    return (f"{what} on one input whose outputs are not read only by Linears that are summed (an attention "
            "without an output projection, say): the merged op's columns have no Linear to be split into, "
            "so they stay apart")


def _describe_inputs(xs) -> str:
    lns = [as_layer_norm(x) for x in xs]
    if all(ln is not None for ln in lns) and len({ln.input for ln in lns}) == 1:
        eps = sorted({ln.eps for ln in lns})
        if len(eps) > 1:
            return "branches normalize the same tensor with different LayerNorm eps (" + \
                   " vs ".join(f"{e:g}" for e in eps) + ")"
        return "branches read LayerNorms of the same tensor that could not be shared"
    return "branches read different tensors (" + ", ".join(sorted({x.name for x in xs})) + ")"


def _describe_mixed(nodes) -> str:
    """Why branches whose pre-activations are sums of Linears (partly joined, 0 < lam < 1, or lam = 0 written
    as a mix) stay apart: merge_affine writes such a sum as one Linear unless one of its Linears is also read
    elsewhere, which is then named."""
    leaks = set()
    for n in nodes:
        todo, seen = [n.args[0]], set()
        while todo:
            a = todo.pop()
            if a in seen or not isinstance(a, fx.Node):
                continue
            seen.add(a)
            if as_linear(a) is not None:
                leaks |= {a.name for u in a.users if u not in seen and arith_kind(u) is None
                          and u not in nodes}
            elif arith_kind(a) is not None:
                todo += [b for b in a.args if isinstance(b, fx.Node)]
    pres = ", ".join(dict.fromkeys(n.args[0].name for n in nodes))
    verb = "is" if len(leaks) == 1 else "are"
    why = f": {', '.join(sorted(leaks))} {verb} also read elsewhere, so fxrep keeps the sum as written" \
        if leaks else ""
    return (f"pre-activations {pres} are sums of Linears, not one Linear each{why}; these branches do not "
            "widen")


def _masking_key(att) -> tuple:
    """Attention ops merge only with the same mask node, the same ``is_causal`` and, with a mask, the same
    heads per tiling of a per-head mask (docs/identities.md §6)."""
    return (att.attn_mask, att.is_causal, att.tokens_first,
            att.num_heads // att.mask_repeats if att.attn_mask is not None else None)


def _split_by_masking(nodes, skipped: list) -> list:
    """``nodes`` split by ``_masking_key``; the branches left out of the largest part are reported."""
    parts: dict = {}
    for n in nodes:
        parts.setdefault(_masking_key(attention_view(n)), []).append(n)
    if len(parts) > 1:
        largest = max(parts.values(), key=len)
        odd = [n for ns in parts.values() if ns is not largest for n in ns]
        skipped.append(Skip(odd, "attention branches on one input use different masks or is_causal (or "
                                 "per-head masks over different head counts): merged only where they agree"))
    return list(parts.values())


def sibling_groups(ctx, kind: str):
    """Groups of ``kind`` ('mlp' or 'attention') branch nodes that may be merged (lists of nodes), and the
    Skips of near misses."""
    def compute():
        analysis = affine_analysis(ctx)
        groups: dict = {}
        shared_pre: list = []  # MLP branches whose pre-activation is also read elsewhere
        mixed_pre: dict = {}   # MLP branches whose pre-activation is arithmetic on Linears, not one Linear
        unowned: dict = {}     # branches on one input whose output is not read by Linears into one sum
        for n in ctx.graph.nodes:
            if kind == "mlp":
                key = activation_key(n)
                pre = as_linear(n.args[0]) if key is not None else None
                if pre is None:
                    pre_node = n.args[0] if key is not None else None
                    if isinstance(pre_node, fx.Node) and arith_kind(pre_node) is not None:
                        mixed_pre.setdefault((_owner(n, analysis), key), []).append(n)
                    continue
                x, dtype = pre.input, pre.weight.dtype
                if len(pre.node.users) != 1:
                    shared_pre.append((n, key, x, dtype))
                    continue
            else:
                att = attention_view(n)
                if att is None:
                    continue
                key, x, dtype = "attention", att.input, att.dtype
            owner = _owner(n, analysis)
            if owner is None:
                unowned.setdefault((key, x), []).append(n)
                continue
            groups.setdefault((owner, key, dtype), {}).setdefault(x, []).append(n)
        mergeable, skipped = [], []
        for nodes in unowned.values():
            if len(nodes) > 1:
                skipped.append(Skip(nodes, _describe_unowned(kind)))
        for n, key, x, dtype in shared_pre:
            owner = _owner(n, analysis)
            if x in groups.get((owner, key, dtype), {}):
                skipped.append(Skip([n], f"this branch's pre-activation {n.args[0].name} is also read by "
                                         "another op: it cannot widen with the branches beside it"))
        for (owner, key), nodes in mixed_pre.items():
            beside = sum(len(ns) for (o, k, _), by_input in groups.items() if (o, k) == (owner, key)
                         for ns in by_input.values())
            if owner is not None and len(nodes) + beside > 1:
                skipped.append(Skip(nodes, _describe_mixed(nodes), provisional=True))
        for by_input in groups.values():
            for nodes in by_input.values():
                parts = _split_by_masking(nodes, skipped) if kind == "attention" else [nodes]
                mergeable += [p for p in parts if len(p) > 1]
            if len(by_input) > 1:  # report the branches left out of the largest group
                largest = max(by_input.values(), key=len)
                odd = [n for ns in by_input.values() if ns is not largest for n in ns]
                skipped.append(Skip(odd, _describe_inputs(list(by_input))))
        return mergeable, skipped
    return ctx.cached(f"siblings:{kind}", compute)


def _repoint_readers(ctx, branches, merged: fx.Node, columns, total: int) -> None:
    """Every Linear that read branch i now reads ``merged`` (``total`` wide) at ``columns[i]``."""
    for node, cols in zip(branches, columns):
        for user in list(node.users):
            lin = as_linear(user)
            with ctx.graph.inserting_before(user):
                bias = None if lin.bias is None else lin.bias.detach().clone()
                new = emit_linear(ctx.graph, merged, algebra.place_columns(lin.weight, total, cols), bias,
                                  lin.weight.dtype, user.name, merge_origins([user]), owned=True)
            ctx.replace_node(user, new)


def _first(nodes, ctx):
    order = ctx.cached("order", lambda: {n: i for i, n in enumerate(ctx.graph.nodes)})
    if any(n not in order for n in nodes):  # created in this sweep: recount
        order = {n: i for i, n in enumerate(ctx.graph.nodes)}
    return min(nodes, key=order.__getitem__)


def _by_first(groups):
    """{first node: entry} for node groups (lists) or Skips."""
    return {(g.nodes[0] if isinstance(g, Skip) else g[0]): g for g in groups}


def _match_group(node, ctx, cache_key: str, groups, summary):
    """Match a group of siblings at its first node (``summary(nodes)`` describes it), or the Skip of a near
    miss; ``groups()`` gives (mergeable groups, Skips) once per graph state."""
    mergeable, skipped = ctx.cached(cache_key, lambda: tuple(map(_by_first, groups())))
    if node in mergeable:
        return Match(mergeable[node], None, summary(mergeable[node]))
    if node in skipped:
        return skipped[node]
    return None


def _out_features(node: fx.Node) -> int:
    """The summed width of the Linears that read ``node`` (every reader of a widen candidate is a Linear)."""
    return sum(as_linear(u).out_features for u in node.users)


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
    name = "widen_mlp"
    phase = "fuse"

    def match(self, node, ctx):
        found = _match_group(node, ctx, self.name, lambda: sibling_groups(ctx, "mlp"), lambda nodes: (
            f"{len(nodes)} parallel {activation_key(nodes[0])[0]} MLP branches -> one wider MLP"))
        return _priced(found, ctx, self._decision(found.nodes, ctx) if isinstance(found, Match) else None)

    @staticmethod
    def _decision(acts, ctx):
        pres = [as_linear(a.args[0]) for a in acts]
        shape = known_shape(pres[0].input)
        note = cost.unpriced(ctx, shape)
        if note:
            return note
        activation = (_activation_name(acts[0]), _activation_fn(acts[0], ctx))
        return cost.decide(ctx, cost.mlp_group(shape, [p.out_features for p in pres], _out_features(acts[0]),
                                               activation, pres[0].weight.dtype))

    def replace(self, match, ctx):
        acts = list(match.nodes)
        pres = [as_linear(a.args[0]) for a in acts]
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
    phase = "fuse"
    mode = ""

    def groups(self, ctx):
        mergeable, skipped = sibling_groups(ctx, "attention")
        if self.mode == "widen":
            return mergeable, skipped
        out = []
        for nodes in mergeable:
            parts: list[list] = []
            for n in nodes:
                for part in parts:
                    if same_logits(attention_view(part[0]), attention_view(n)):
                        part.append(n)
                        break
                else:
                    parts.append([n])
            out += [p for p in parts if len(p) > 1]
        return out, []

    def match(self, node, ctx):
        found = _match_group(node, ctx, self.name, lambda: self.groups(ctx), self._summary)
        if self.mode != "widen" or not isinstance(found, Match):
            return found  # collapsing shares one softmax: fewer FLOPs at any shape
        return _priced(found, ctx, self._decision(found.nodes, ctx))

    @staticmethod
    def _decision(nodes, ctx):
        atts = [attention_view(n) for n in nodes]
        shape = known_shape(atts[0].input)
        note = cost.unpriced(ctx, shape)
        if note:
            return note
        branches = [(a.params(), a.num_heads, a.num_heads * a.head_widths()[2]) for a in atts]
        options = {"is_causal": atts[0].is_causal is True, "tokens_first": atts[0].tokens_first}

        def merge():
            params, heads, _, total, _ = merge_heads(atts, "widen")
            return params, heads, total
        return cost.decide(ctx, cost.attention_group(shape, branches, merge, _out_features(nodes[0]), options,
                                                     atts[0].dtype))

    def _summary(self, nodes) -> str:
        if self.mode == "collapse":
            return f"{len(nodes)} attention branches with joined logits -> one attention"
        heads = sum(attention_view(n).num_heads for n in nodes)
        return f"{len(nodes)} parallel attention branches -> one attention with {heads} heads"

    def replace(self, match, ctx):
        atts = [attention_view(n) for n in match.nodes]
        params, heads, columns, total, masking = merge_heads(atts, self.mode)
        graph = ctx.graph
        readers = [u for n in match.nodes for u in n.users]
        with graph.inserting_before(_first(readers, ctx)):
            merged = emit_attention(graph, atts[0].input, params, heads, atts[0].dtype,
                                    match.nodes[0].name + "_" + self.mode, merge_origins(match.nodes),
                                    # built here
                                    owned={k for k, t in params.items() if t is not getattr(atts[0], k)},
                                    **masking)
        _repoint_readers(ctx, match.nodes, merged, columns, total)
        return {"heads": heads}


class CollapseAttention(_MergeAttention):
    name = "collapse_attention"
    mode = "collapse"


class WidenAttention(_MergeAttention):
    name = "widen_attention"
    mode = "widen"
