"""``extract_layernorm_affine``: move a LayerNorm's affine into the Linears that read it (docs/identities.md
§1).

Before::                                   After::

    y  = layer_norm(x, (d,), g, beta, eps)     n  = layer_norm(x, (d,), None, None, eps)
    q1 = linear(y, W1, b1)                     q1 = linear(n, W1 diag g, W1 beta + b1)
    q2 = linear(y, W2, b2)                     q2 = linear(n, W2 diag g, W2 beta + b2)

Branches that normalize the same tensor with the same eps then read identical affine-free ``layer_norm``
nodes, which ``eliminate_common_subexpressions`` merges into one. Fused attention ops count as Linear
consumers (their q, k and v projections are folded), and so do the Linears behind a permute of the leading
axes (``torch.export`` writes ``nn.MultiheadAttention`` tokens first): the affine acts on the last axis, which
such a permute keeps, so the Linears read the same permute of the affine-free norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import algebra
from ..ir import as_layer_norm, as_linear, attention_view, emit_attention, emit_linear, merge_origins
from ..ir.layout import as_permute
from ..ir.readers import is_shape_read
from ..pattern import Match, Skip


def _consumer_kind(user, ln_node):
    lin = as_linear(user)
    if lin is not None and lin.input is ln_node and ln_node is not lin.weight_node and \
            ln_node is not lin.bias_node:
        return "linear"
    att = attention_view(user)
    if att is not None and att.input is ln_node and user.args.count(ln_node) == 1:
        return "attention"
    return None


def _consumers(node) -> tuple[list, list]:
    """([(consumer, the node it reads)], [other readers]): Linears and attention ops reading ``node``, or a
    permute of its leading axes that only they read."""
    found, others = [], []
    for u in node.users:
        if is_shape_read(u):
            continue
        if _consumer_kind(u, node) is not None:
            found.append((u, node))
            continue
        p = as_permute(u)
        readers = [v for v in u.users if not is_shape_read(v)]
        if p is not None and p.input is node and p.keeps_last_axis and readers and \
                all(_consumer_kind(v, u) is not None for v in readers):
            found += [(v, u) for v in readers]
            continue
        others.append(u)
    return found, others


class ExtractLayerNormAffine:
    name = "extract_layernorm_affine"
    phase = ("canonicalize", "fuse")

    def match(self, node, ctx):
        ln = as_layer_norm(node)
        if ln is None or (ln.weight is None and ln.bias is None):
            return None
        if len(ln.normalized_shape) != 1:
            return Skip([node], f"LayerNorm over {len(ln.normalized_shape)} dims: only last-dim norms fold")
        consumers, others = _consumers(node)
        if others:
            what = ", ".join(sorted({u.name for u in others}))
            return Skip([node], f"LayerNorm output is also read by non-linear ops ({what}); its affine "
                                "cannot be folded into them")
        if not consumers:
            return None
        return Match([node, *node.users, *(c for c, _ in consumers)], (ln, consumers),
                     "LayerNorm affine folded into its Linear consumers")

    def replace(self, match, ctx):
        ln, consumers = match.data
        node = ln.node
        g = ctx.graph
        with g.inserting_before(node):
            bare = g.call_function(F.layer_norm, (ln.input, ln.normalized_shape),
                                   {"weight": None, "bias": None, "eps": ln.eps})
        bare.meta["fxrep_origin"] = merge_origins([node])
        params_before = sum(t.numel() for t in (ln.weight, ln.bias) if t is not None)
        reads = {node: bare}
        for read in dict.fromkeys(r for _, r in consumers):
            if read is not node:  # a permute of the norm: the same permute of the affine-free one
                with g.inserting_before(read):
                    reads[read] = g.call_function(torch.permute, (bare, list(as_permute(read).perm)))
                reads[read].meta.update({k: read.meta[k] for k in ("tensor_meta", "val") if k in read.meta})
        for read, new_read in reads.items():
            for user in [u for u in read.users if is_shape_read(u)]:  # the same shape
                user.replace_input_with(read, new_read)
        for user, read in consumers:
            with g.inserting_before(user):
                if _consumer_kind(user, read) == "linear":
                    lin = as_linear(user)
                    params_before += lin.weight.numel() + (lin.bias.numel() if lin.bias is not None else 0)
                    w, b = algebra.fold_norm_affine(lin.weight, lin.bias, ln.weight, ln.bias)
                    new = emit_linear(g, reads[read], w, b, lin.weight.dtype, user.name,
                                      merge_origins([user, node]), owned=True)
                else:
                    att = attention_view(user)
                    params = {}
                    for p in "qkv":
                        w, b = algebra.fold_norm_affine(att.weight(p), att.bias(p), ln.weight, ln.bias)
                        params[f"{p}_weight"], params[f"{p}_bias"] = w, b
                    new = emit_attention(g, reads[read], params, att.num_heads, att.dtype, user.name,
                                         merge_origins([user, node]), owned=set(params), **att.masking())
            ctx.replace_node(user, new)
        return {"params_before": params_before}
