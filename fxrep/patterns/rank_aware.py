"""``rank_aware_attention``: per layer, the cheaper of two exact forms of attention (docs/identities.md §5).

After joining, head ``h`` has a query/key width ``dq`` and value width ``dv`` that can exceed the model width
``d`` (``B * dh``). Then it is cheaper to store, per head,

    logits:  (X Wq_h^T + bq_h)(X Wk_h^T + bk_h)^T  ==  (X (Wk_h^T Wq_h)^T + Wk_h^T bq_h) X^T  + terms constant
             along the key axis (softmax ignores them exactly)
    values:  P_h (X Wv_h^T + bv_h) Wo_h^T  ==  P_h X (Wo_h Wv_h)^T  +  Wo_h bv_h      (rows of P_h sum to 1)

so q has width ``d``, k is ``X`` itself, v has the output width, and the output projection disappears.
The pattern compares multiply-adds per token of both forms (projections, plus the attention matmuls when
the token count is known from example inputs) and rewrites only when the rank-aware form is cheaper; either
way the report says which form the layer got and why.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from .. import algebra
from ..ir import (
    AttentionView,
    as_layer_norm,
    as_linear,
    attention_view,
    const_node,
    emit_linear,
    merge_origins,
)
from ..ir.build import emit_split_heads, sdpa_masking
from ..pattern import Match, Skip

f64 = algebra.f64


def _tokens(x: fx.Node, tokens_first: bool = False) -> int | None:
    n = x
    while n is not None:
        meta = n.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape") and len(meta.shape) >= 2:
            return int(meta.shape[0 if tokens_first else -2])
        ln = as_layer_norm(n)
        n = ln.input if ln is not None else None
    return None


def costs(att: AttentionView, d_out: int, tokens: int | None) -> tuple[int, int]:
    """(per-head form, rank-aware form) multiply-adds per token."""
    H, dq, dv = att.head_widths()
    d = att.q_weight.shape[1]
    n = tokens or 0
    heads = d * H * (2 * dq + dv) + H * dv * d_out + n * H * (dq + dv)
    rank = d * H * d + d * H * d_out + n * H * (d + d_out) + H * d_out
    return heads, rank


class RankAwareAttention:
    name = "rank_aware_attention"
    phase = "lower"

    def match(self, node, ctx):
        att = attention_view(node)
        if att is None:
            return None
        readers = list(node.users)
        lin = as_linear(readers[0]) if len(readers) == 1 else None
        if lin is None or lin.input is not node:
            return Skip([node], "kept the per-head form: the attention output is not read by exactly one "
                                "Linear")
        tokens = _tokens(att.input, att.tokens_first)
        heads, rank = costs(att, lin.out_features, tokens)
        basis = (f"{tokens} tokens" if tokens else
                 "projections only (pass example_inputs to count the attention matmuls)")
        if rank >= heads:
            return Skip([node], f"kept the per-head form: {heads:,} MACs/token vs {rank:,} rank-aware "
                                f"({basis})")
        return Match([node, lin.node], lin, f"rank-aware form: {heads:,} -> {rank:,} MACs/token ({basis})")

    def replace(self, match, ctx):
        node, reader = match.nodes
        att, lin = attention_view(node), match.data
        H = att.num_heads
        wq, bq = algebra.head_rows(att.q_weight, att.q_bias, H)
        wk, bk = algebra.head_rows(att.k_weight, att.k_bias, H)
        wv, bv = algebra.head_rows(att.v_weight, att.v_bias, H)
        wo = algebra.as64(lin.weight)                      # (d_out, H * dv)
        dv = wv.shape[1]
        q_rows, q_bias, v_rows = [], [], []
        out_bias = algebra.as64(lin.bias) if lin.bias is not None else torch.zeros(wo.shape[0], dtype=f64)
        for h in range(H):
            # (d, d): logits X (Wk^T Wq)^T X^T ... see docstring
            q_rows.append(wk[h].T @ wq[h])
            q_bias.append(wk[h].T @ bq[h] if bq is not None else torch.zeros(wk.shape[2], dtype=f64))
            wo_h = wo[:, h * dv:(h + 1) * dv]
            v_rows.append(wo_h @ wv[h])                    # (d_out, d)
            if bv is not None:
                out_bias = out_bias + wo_h @ bv[h]
        g = ctx.graph
        dtype = att.dtype
        origins = merge_origins([node, reader])
        with g.inserting_before(reader):
            x = g.call_method("transpose", (att.input, 0, -2)) if att.tokens_first else att.input
            q = emit_linear(g, x, torch.cat(q_rows), torch.cat(q_bias) if bq is not None else None, dtype,
                            node.name + "_qk", origins)
            q = emit_split_heads(g, q, H)
            k = g.call_method("expand_as", (g.call_method("unsqueeze", (x, -3)), q))  # one k for all heads
            v = emit_linear(g, x, torch.cat(v_rows), None, dtype, node.name + "_vo", origins)
            v = emit_split_heads(g, v, H)
            o = g.call_function(F.scaled_dot_product_attention, (q, k, v), sdpa_masking(g, att))
            out = g.call_method("sum", (o, -3))
            if bool(out_bias.any()):
                out = g.call_function(torch.add,
                                      (out, const_node(g, out_bias.to(dtype), node.name + "_out_bias")))
            if att.tokens_first:
                out = g.call_method("transpose", (out, 0, -2))
        ctx.replace_node(reader, out)
