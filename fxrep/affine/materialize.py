"""Emitting an affine form as graph nodes: one Linear per matrix term (the bias folded into one of them), a
multiply per scaled term, and adds."""

from __future__ import annotations

import torch
from torch import fx

from ..ir import const_node, emit_linear
from .forms import Affine, dense, normalized_bias


def materialize(graph: fx.Graph, f: Affine, ctx, order, hint: str, origins) -> fx.Node:
    """Nodes computing ``f`` at the insertion point; bases are resolved through ``ctx`` (a base may have been
    replaced earlier in the sweep), terms are emitted in graph order of their bases."""
    items = sorted(f.terms.items(), key=lambda kv: order.get(kv[0], -1))
    bias = normalized_bias(f)
    parts = []
    for base, t in items:
        b = ctx.resolve(base)
        t = dense(t)
        if t.dim() == 2:
            absorb = bias is not None and bias.dim() == 1
            parts.append(emit_linear(graph, b, t, bias if absorb else None, f.dtype, hint, origins))
            if absorb:
                bias = None
        elif t.dim() == 1:
            parts.append(graph.call_function(torch.mul,
                                             (b, const_node(graph, t.to(f.dtype), hint + "_scale"))))
        else:
            parts.append(b if float(t) == 1.0 else graph.call_function(torch.mul, (b, float(t))))
    acc = parts[0]
    for p in parts[1:]:
        acc = graph.call_function(torch.add, (acc, p))
    if bias is not None:
        c = float(bias) if bias.dim() == 0 else const_node(graph, bias.to(f.dtype), hint + "_bias")
        acc = graph.call_function(torch.add, (acc, c))
    return acc
