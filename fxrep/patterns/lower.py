"""``lower_attention``: expand fxrep's ``multi_head_attention`` op into plain torch ops, last.

One Linear computes q, k and v together (one GEMM instead of three), then ``F.scaled_dot_product_attention``
with ``scale=1.0`` (the scale lives in the q weights). The result is exportable with ``torch.export``/ONNX.
"""

from __future__ import annotations

import operator

import torch.nn.functional as F

from .. import algebra
from ..ir import attention_view, emit_linear
from ..ir.build import emit_split_heads, sdpa_masking
from ..pattern import Match


class LowerAttention:
    name = "lower_attention"
    phase = "lower"

    def match(self, node, ctx):
        att = attention_view(node)
        if att is None:
            return None
        return Match([node], att, f"attention with {att.num_heads} heads -> linear + SDPA")

    def replace(self, match, ctx):
        node, att = match.nodes[0], match.data
        H = att.num_heads
        widths = [att.weight(p).shape[0] for p in "qkv"]
        w, b = algebra.concat_rows([att.weight(p) for p in "qkv"], [att.bias(p) for p in "qkv"])
        g = ctx.graph
        with g.inserting_before(node):
            x = g.call_method("transpose", (att.input, 0, -2)) if att.tokens_first else att.input
            qkv = emit_linear(g, x, w, b, att.dtype, node.name + "_qkv",
                              node.meta.get("fxrep_origin", ()), owned=True)
            parts = g.call_method("split", (qkv, widths), {"dim": -1})
            heads = []
            for i in range(3):
                heads.append(emit_split_heads(g, g.call_function(operator.getitem, (parts, i)), H))
            o = g.call_function(F.scaled_dot_product_attention, tuple(heads), sdpa_masking(g, att))
            o = g.call_method("transpose", (o, -3, -2))
            out = g.call_method("flatten", (o, -2))
            if att.tokens_first:
                out = g.call_method("transpose", (out, 0, -2))
        ctx.replace_node(node, out)
