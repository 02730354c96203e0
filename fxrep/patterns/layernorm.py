"""``extract_layernorm_affine``: move a LayerNorm's affine into the Linears that read it (docs/identities.md
§1).

Before::                                   After::

    y  = layer_norm(x, (d,), g, beta, eps)     n  = layer_norm(x, (d,), None, None, eps)
    q1 = linear(y, W1, b1)                     q1 = linear(n, W1 diag g, W1 beta + b1)
    q2 = linear(y, W2, b2)                     q2 = linear(n, W2 diag g, W2 beta + b2)

Branches that normalize the same tensor with the same eps then read identical affine-free ``layer_norm``
nodes, which ``eliminate_common_subexpressions`` merges into one. Fused attention ops count as Linear
consumers (their q, k and v projections are folded).
"""

from __future__ import annotations

import torch.nn.functional as F

from .. import algebra
from ..ir import (
    as_layer_norm,
    as_linear,
    attention_view,
    emit_attention,
    emit_linear,
    is_shape_read,
    merge_origins,
)
from ..pattern import Match, Skip


def _consumer_kind(user, ln_node):
    lin = as_linear(user)
    if lin is not None and lin.input is ln_node and ln_node not in user.args[1:] and \
            ln_node not in user.kwargs.values():
        return "linear"
    att = attention_view(user)
    if att is not None and att.input is ln_node and user.args.count(ln_node) == 1:
        return "attention"
    return None


class ExtractLayerNormAffine:
    name = "extract_layernorm_affine"
    phase = ("canonicalize", "fuse")

    def match(self, node, ctx):
        ln = as_layer_norm(node)
        if ln is None or (ln.weight is None and ln.bias is None):
            return None
        if len(ln.normalized_shape) != 1:
            return Skip([node], f"LayerNorm over {len(ln.normalized_shape)} dims: only last-dim norms fold")
        others = [u for u in node.users if _consumer_kind(u, node) is None and not is_shape_read(u)]
        if others:
            what = ", ".join(sorted({u.name for u in others}))
            return Skip([node], f"LayerNorm output is also read by non-linear ops ({what}); its affine "
                                "cannot be folded into them")
        if not node.users:
            return None
        return Match([node, *node.users], ln, "LayerNorm affine folded into its Linear consumers")

    def replace(self, match, ctx):
        ln = match.data
        node = ln.node
        g = ctx.graph
        with g.inserting_before(node):
            bare = g.call_function(F.layer_norm, (ln.input, ln.normalized_shape),
                                   {"weight": None, "bias": None, "eps": ln.eps})
        bare.meta["fxrep_origin"] = merge_origins([node])
        params_before = sum(t.numel() for t in (ln.weight, ln.bias) if t is not None)
        for user in list(node.users):
            if is_shape_read(user):  # the affine-free norm has the same shape
                user.replace_input_with(node, bare)
                continue
            with g.inserting_before(user):
                if _consumer_kind(user, node) == "linear":
                    lin = as_linear(user)
                    params_before += lin.weight.numel() + (lin.bias.numel() if lin.bias is not None else 0)
                    w, b = algebra.fold_norm_affine(lin.weight, lin.bias, ln.weight, ln.bias)
                    new = emit_linear(g, bare, w, b, lin.weight.dtype, user.name, merge_origins([user, node]),
                                      owned=True)
                else:
                    att = attention_view(user)
                    params = {}
                    for p in "qkv":
                        w, b = algebra.fold_norm_affine(att.weight(p), att.bias(p), ln.weight, ln.bias)
                        params[f"{p}_weight"], params[f"{p}_bias"] = w, b
                    new = emit_attention(g, bare, params, att.num_heads, att.dtype, user.name,
                                         merge_origins([user, node]), owned=set(params), **att.masking())
            ctx.replace_node(user, new)
        return {"params_before": params_before}
