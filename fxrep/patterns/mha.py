"""``lift_multihead_attention``: an ``nn.MultiheadAttention`` self-attention call becomes fxrep's attention op
and a Linear (its ``out_proj``), so torchvision's ``VisionTransformer`` and anyone's ``nn.MultiheadAttention``
branches widen, collapse and lower like every other attention.

``MultiheadAttention(x, x, x)`` computes per head ``softmax(q_h k_h^T / sqrt(d_h)) v_h`` with
``q = x W_q^T + b_q`` (rows of the packed ``in_proj_weight``, or ``q_proj_weight``), heads as consecutive
blocks of ``d_h`` rows, then ``out_proj``. The scale is folded into the q weights (float64, cast back).
With ``batch_first=False`` the tokens are on dim 0: the op is told so (``tokens_first``), so its input and
output keep the caller's layout and the LayerNorm before it and the Linears after it merge as for any
attention. ``attn_mask`` and ``key_padding_mask`` (boolean, where True means "do not attend", the opposite of
SDPA's, or float) are merged into one SDPA mask at run time by ``ops.multihead_attention_mask``, exactly as
``F.multi_head_attention_forward`` merges them; branches passing the same masks share that node and merge.
Skipped with the reason: cross-attention, ``is_causal``, ``add_bias_kv``, ``add_zero_attn``, other key/value
widths, and attention weights that are read.
"""

from __future__ import annotations

import operator

from torch import nn

from .. import algebra
from ..ir import bind, emit_attention, emit_linear, fetch_attr
from ..ops import multihead_attention_mask
from ..pattern import Match, Skip

f64 = algebra.f64


def _unsupported(m: nn.MultiheadAttention, args: dict) -> str | None:
    """Why this call cannot be lifted, or None."""
    if not (args.get("query") is args.get("key") is args.get("value")):
        return "nn.MultiheadAttention with different query, key and value (cross-attention)"
    if args.get("is_causal") is not False:
        return "nn.MultiheadAttention with is_causal"
    if m.bias_k is not None or m.add_zero_attn:
        return "nn.MultiheadAttention with add_bias_kv or add_zero_attn (extra key/value rows)"
    if m.kdim != m.embed_dim or m.vdim != m.embed_dim:
        return "nn.MultiheadAttention with key/value widths other than embed_dim"
    return None


def _params(m: nn.MultiheadAttention) -> dict:
    """q/k/v weights and biases in float64, the softmax scale folded into q."""
    E, scale = m.embed_dim, (m.embed_dim // m.num_heads) ** -0.5
    if m._qkv_same_embed_dim:
        ws = m.in_proj_weight.detach().to(f64).split(E)
    else:
        ws = [w.detach().to(f64) for w in (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)]
    bs = m.in_proj_bias.detach().to(f64).split(E) if m.in_proj_bias is not None else (None,) * 3
    return {"q_weight": ws[0] * scale, "q_bias": bs[0] * scale if bs[0] is not None else None,
            "k_weight": ws[1], "k_bias": bs[1], "v_weight": ws[2], "v_bias": bs[2]}


def _merged_mask(g, x, masks, m: nn.MultiheadAttention):
    """The node computing the SDPA mask of ``masks`` (``ops.multihead_attention_mask``); branches that pass
    the same masks read one such node, so they merge like attention ops with one shared mask."""
    args = (*masks, m.num_heads, x)
    for u in x.users:
        if u.op == "call_function" and u.target is multihead_attention_mask and u.args == args:
            return u
    return g.call_function(multihead_attention_mask, args)


class LiftMultiheadAttention:
    name = "lift_multihead_attention"
    phase = "lift"

    def match(self, node, ctx):
        if node.op != "call_module" or not isinstance(fetch_attr(ctx.gm, node.target), nn.MultiheadAttention):
            return None
        m, args = fetch_attr(ctx.gm, node.target), bind(node)
        if args is None:
            return Skip([node], "nn.MultiheadAttention called with arguments fxrep cannot bind")
        reason = _unsupported(m, args)
        if reason is not None:
            return Skip([node], reason)
        outs = list(node.users)
        if not all(u.op == "call_function" and u.target is operator.getitem and u.args[1] in (0, 1)
                   for u in outs):
            return Skip([node], "the output tuple of nn.MultiheadAttention is used whole")
        if any(u.args[1] == 1 and u.users for u in outs):
            return Skip([node], "the attention weights nn.MultiheadAttention returns are read")
        masks = (args.get("attn_mask"), args.get("key_padding_mask"))
        masked = " with its masks merged" if masks != (None, None) else ""
        return Match([node, *outs], (m, args["query"], masks), f"nn.MultiheadAttention, {m.num_heads} heads "
                                                               f"-> multi_head_attention{masked} + out_proj")

    def replace(self, match, ctx):
        node, (m, x, masks) = match.nodes[0], match.data
        g, params = ctx.graph, _params(m)
        dtype = m.out_proj.weight.dtype
        with g.inserting_before(node):
            mask = _merged_mask(g, x, masks, m) if masks != (None, None) else None
            out = emit_attention(g, x, params, m.num_heads, dtype, node.name, (node.target,),
                                 owned=set(params),
                                 attn_mask=mask, tokens_first=not m.batch_first)
            # a copy of out_proj (not a get_attr into the module, which would keep all its parameters alive)
            b = m.out_proj.bias.detach() if m.out_proj.bias is not None else None
            out = emit_linear(g, out, m.out_proj.weight.detach(), b, dtype, f"{node.name}_out_proj")
        out.meta["fxrep_origin"] = (f"{node.target}.out_proj",)
        for u in match.nodes[1:]:
            if u.args[1] == 0:
                ctx.replace_node(u, out)
