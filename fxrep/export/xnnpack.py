"""ATen spellings XNNPACK can take whole, applied to a program before ExecuTorch lowers it.

ExecuTorch hands XNNPACK only the ops it has kernels for and runs the rest with its own portable kernels,
which cuts the graph into many delegate calls. In an exported ViT three spellings do that:

- ``scaled_dot_product_attention`` decomposes into matmuls and a *safe* softmax (``eq``/``any``/``where`` on
  every (heads, N, N) logit tensor, for rows masked out entirely) plus 4-d matmuls that ``expand_copy`` their
  operands and a ``mul.Scalar`` for the scale: none of these are delegated. Without a mask no row can be
  masked out, so the same function is ``softmax(q k^T * scale) v``, written here with ``bmm``:
  - a key shared by every head (fxrep's rank-aware attention reads the block input itself) is not copied per
    head: the heads are stacked as rows of one ``bmm``;
  - attention whose head outputs are summed (the rank-aware form again) becomes one ``bmm`` over the stacked
    heads, so the sum over heads is part of the product. Its queries are stacked in the (token, head) order
    their Linear writes them, and values from a Linear no wider than its input are applied after the product
    (``sum_h P_h (Y W_h^T + b_h) = [P_1 Y ... P_H Y] Wcat^T + sum_h b_h``), so nothing is transposed.
- ``squeeze``, ``unsqueeze``, ``select`` and ``unbind`` (timm splits q, k and v with ``unbind``) become
  ``slice`` and ``reshape``, which XNNPACK takes.
- ``layer_norm`` over the last axis is written with ``linear`` (its means: one output, weights ``1 / width``),
  ``sub``, ``mul``, ``add`` and ``rsqrt``; XNNPACK's ``mean`` would need two transposes around it.

Each rewrite is a pattern on fxrep's one contract (``fxrep.pattern``; ``PATTERNS``, run by the engine as the
phase ``xnnpack``): matching never mutates, arguments are read through ``ir.bind``, the engine erases. Each is
the same function up to float rounding: ``rewrite_for_xnnpack`` runs the program before and after on its
example inputs and raises InternalError if they differ by more than 1e-5 relative.
Measured effect: ``benchmarks/latency.py --executorch`` (README, "Deploy to phones").
"""

from __future__ import annotations

import functools
import operator

import torch
from torch import fx

from .. import algebra
from ..engine import run_pass
from ..ir import bind, const_node
from ..ir.readers import fetch_attr
from ..ir.recorded import recorded_shape, same_size
from ..pattern import Match
from ..program import export_rewritten

PHASE = "xnnpack"

aten = torch.ops.aten


def rewrite_for_xnnpack(program: torch.export.ExportedProgram, example_inputs: tuple) -> \
        torch.export.ExportedProgram:
    """A new program computing the same function in spellings XNNPACK delegates whole (see the module
    docstring); ``program`` is not modified. A program with nothing to rewrite is returned as it is.

    Rewrite float programs, before quantizing: the check compares outputs at 1e-5, and in a quantized program
    a rounding difference before a quantize op moves the output by whole quantization steps. The nodes a
    LayerNorm is written with are tagged (``keeps_float``): a quantizer must leave them in float."""
    module = program.module()
    if not run_pass(module, PATTERNS, PHASE).applied:
        return program
    module.recompile()
    return export_rewritten(program, module, example_inputs, rewrite="rewriting the program for XNNPACK",
                            switch="xnnpack_rewrites=False to to_executorch")


def _ints(*sizes) -> bool:
    return all(isinstance(s, int) for s in sizes)


def _replace(ctx, old: fx.Node, new: fx.Node) -> None:
    """``new`` in place of ``old``, with ``old``'s value recorded so later rewrites can read its shape."""
    if "val" in old.meta:
        new.meta["val"] = old.meta["val"]
    ctx.replace_node(old, new)


def _sizes(node: fx.Node) -> list | None:
    """A reshape target for ``node``'s recorded shape: its sizes, with -1 for the one symbolic (batch)
    size."""
    shape = recorded_shape(node)
    if shape is None:
        return None
    sizes = [s if isinstance(s, int) else -1 for s in shape]
    return sizes if sizes.count(-1) <= 1 else None


# --- attention
# ------------------------------------------------------------------------------------------------

def _plain_attention(node: fx.Node):
    """(q, k, v, scale) of an SDPA call with no mask, dropout, causal flag or grouped heads, on 4-d tensors
    whose head, token and feature sizes are static; else None."""
    if node.target is not aten.scaled_dot_product_attention.default:
        return None
    options = bind(node) or {}
    q, k, v = options.get("query"), options.get("key"), options.get("value")
    if options.get("attn_mask") is not None or options.get("is_causal") or options.get("dropout_p") or \
            options.get("enable_gqa"):
        return None
    qs, ks, vs = recorded_shape(q), recorded_shape(k), recorded_shape(v)
    if qs is None or ks is None or vs is None or not len(qs) == len(ks) == len(vs) == 4:
        return None
    if not _ints(*qs[1:], *ks[1:], *vs[1:]) or not same_size(qs[0], ks[0]) or not same_size(qs[0], vs[0]) or \
            ks[2] != vs[2] or vs[1] != qs[1]:
        return None
    if ks[1] not in (1, qs[1]):
        return None
    scale = options.get("scale")
    return q, k, v, (qs[-1] ** -0.5 if scale is None else scale)


def _shared_key(k: fx.Node, batch) -> fx.Node | None:
    """The (batch, 1, tokens, dim) tensor behind a key every head reads alike (broadcast or expanded)."""
    while k.target in (aten.expand.default, aten.expand_as.default) and \
            len(recorded_shape(bind(k)["input"]) or ()) == 4:
        k = bind(k)["input"]
    shape = recorded_shape(k)
    return k if shape[1] == 1 and same_size(shape[0], batch) else None


def _head_sum(node: fx.Node) -> fx.Node | None:
    """The only user of ``node`` when it sums the heads (axis 1 of a 4-d tensor), else None."""
    if len(node.users) != 1:
        return None
    (user,) = node.users
    if user.target is not aten.sum.dim_IntList:
        return None
    args = bind(user)
    heads_only = list(args["dim"]) in ([1], [-3]) and not args["keepdim"] and args["dtype"] is None
    return user if heads_only else None


def _tokens_major(t: fx.Node) -> fx.Node | None:
    """``src`` when ``t`` is a 4-d ``src`` of shape (batch, tokens, heads, dim) with its token and head axes
    swapped (how heads split from a Linear's features reach attention), else None."""
    if t.target not in (aten.transpose.int, aten.permute.default):
        return None
    args = bind(t)
    dims = [a % 4 for a in ((args["dim0"], args["dim1"]) if t.target is aten.transpose.int else args["dims"])]
    if dims not in ([1, 2], [2, 1], [0, 2, 1, 3]) or len(recorded_shape(args["input"]) or ()) != 4:
        return None
    return args["input"]


def _split_linear(gm: fx.GraphModule, v: fx.Node):
    """(y, weight, bias) when ``v`` is the (batch, heads, tokens, dv) heads of ``linear(y, weight, bias)``
    (its features split into heads, then heads moved before tokens), weight and bias constant; else None."""
    src = _tokens_major(v)
    lin = bind(src)["input"] if src is not None and src.target in (aten.unflatten.int, aten.view.default,
                                                                     aten.reshape.default) else None
    if lin is None or lin.target is not aten.linear.default:
        return None
    (batch, m, width), (_, heads, _, dv) = recorded_shape(lin), recorded_shape(v)
    if not (same_size(batch, recorded_shape(src)[0]) and recorded_shape(src)[1:] == (m, heads, dv)
            and width == heads * dv):
        return None  # features split as (heads, dv), batch and token axes kept
    args = bind(lin)
    y, w, b = args["input"], args["weight"], args["bias"]
    if w.op != "get_attr" or (b is not None and b.op != "get_attr") or len(recorded_shape(y) or ()) != 3:
        return None
    return y, fetch_attr(gm, w.target), (fetch_attr(gm, b.target) if b is not None else None)


def _summed_values(gm: fx.GraphModule, graph: fx.Graph, probs, v, heads: int, n: int, m: int, dv: int):
    """``sum_h P_h V_h`` for probabilities stacked as (batch, tokens * heads, m) rows (token, head).

    Where ``V_h = Y W_h^T + b_h`` is a split Linear of width ``dy <= dv`` this is ``[P_1 Y ... P_H Y] Wcat^T +
    sum_h b_h`` (rows of P sum to 1): one ``bmm`` against Y itself, whose rows come out in the order the
    Linear reads them, and one Linear with the weights side by side, so no tensor is transposed and XNNPACK
    packs Y (dy wide) instead of V. Otherwise ``[P_1 ... P_H] [V_1; ...; V_H]``."""
    call = graph.call_function
    found = _split_linear(gm, v)
    if found is None or recorded_shape(found[0])[-1] > dv:
        return call(aten.bmm.default, (call(aten.reshape.default, (probs, [-1, n, heads * m])),
                                       call(aten.reshape.default, (v, [-1, heads * m, dv]))))
    y, w, b = found
    dy = recorded_shape(y)[-1]
    weight = w.to(algebra.f64).view(heads, dv, dy).transpose(0, 1).reshape(dv, heads * dy).to(w.dtype)
    bias = b.to(algebra.f64).view(heads, dv).sum(0).to(b.dtype) if b is not None else None
    z = call(aten.bmm.default, (probs, call(aten.reshape.default, (y, [-1, m, dy]))))
    args = [call(aten.reshape.default, (z, [-1, n, heads * dy])),
            const_node(graph, weight, "xnnpack_vo_weight", True)]
    if bias is not None:
        args.append(const_node(graph, bias, "xnnpack_vo_bias", owned=True))
    return call(aten.linear.default, tuple(args))


def _key_transposed(graph: fx.Graph, shared: fx.Node, m: int, d: int) -> fx.Node:
    """The (batch, d, m) transpose of a key every head reads alike."""
    call = graph.call_function
    return call(aten.permute.default, (call(aten.reshape.default, (shared, [-1, m, d])), [0, 2, 1]))


def _attention(gm: fx.GraphModule, node: fx.Node, q, k, v, scale, summed) -> fx.Node:
    """The nodes computing ``node`` (or ``summed``, its sum over heads) with ``bmm`` and ``_softmax``."""
    graph = gm.graph
    call = graph.call_function
    (batch, heads, n, d), m, dv = recorded_shape(q), recorded_shape(k)[2], recorded_shape(v)[-1]
    shared, by_token = _shared_key(k, batch), _tokens_major(q)
    with graph.inserting_before(node):
        if shared is not None and summed is not None and by_token is not None:
            # heads stacked as rows (token, head), as the q Linear wrote them: nothing is transposed
            q = call(aten.reshape.default, (by_token, [-1, n * heads, d]))
            q = call(aten.mul.Tensor, (q, float(scale))) if scale != 1.0 else q
            probs = call(aten._softmax.default,
                         (call(aten.bmm.default, (q, _key_transposed(graph, shared, m, d))),
                                                 -1, False))
            return _summed_values(gm, graph, probs, v, heads, n, m, dv)
        return _heads_first_attention(graph, q, k, v, scale, shared, summed, (heads, n, d, m, dv))


def _heads_first_attention(graph, q, k, v, scale, shared, summed, sizes):
    """Attention on (batch, heads, tokens, dim) operands, heads stacked as rows of one product where every
    head reads one key."""
    call = graph.call_function
    heads, n, d, m, dv = sizes
    if scale != 1.0:
        q = call(aten.mul.Tensor, (q, float(scale)))
    if shared is not None:  # every head against one key: heads stacked as rows, one product
        logits = call(aten.bmm.default, (call(aten.reshape.default, (q, [-1, heads * n, d])),
                                         _key_transposed(graph, shared, m, d)))
    else:
        key_t = call(aten.reshape.default, (call(aten.transpose.int, (k, -2, -1)), [-1, d, m]))
        logits = call(aten.bmm.default, (call(aten.reshape.default, (q, [-1, n, d])), key_t))
    probs = call(aten._softmax.default, (logits, -1, False))
    if summed is not None:  # sum over heads of P_h V_h = [P_1 ... P_H] [V_1; ...; V_H]
        by_token = call(aten.permute.default, (call(aten.reshape.default, (probs, [-1, heads, n, m])),
                                               [0, 2, 1, 3]))
        return call(aten.bmm.default, (call(aten.reshape.default, (by_token, [-1, n, heads * m])),
                                       call(aten.reshape.default, (v, [-1, heads * m, dv]))))
    out = call(aten.bmm.default, (call(aten.reshape.default, (probs, [-1, n, m])),
                                  call(aten.reshape.default, (v, [-1, m, dv]))))
    return call(aten.reshape.default, (out, [-1, heads, n, dv]))


class AttentionAsBmm:
    """Every plain SDPA call (``_plain_attention``) written with ``bmm`` and ``_softmax``; where its heads are
    summed, the sum is part of the product."""

    name, phase = "attention_as_bmm", PHASE

    def match(self, node, ctx):
        parts = _plain_attention(node)
        if parts is None:
            return None
        summed = _head_sum(node)
        return Match((node,) if summed is None else (node, summed), (*parts, summed), "SDPA as bmm")

    def replace(self, match, ctx):
        node, (q, k, v, scale, summed) = match.nodes[0], match.data
        _replace(ctx, summed or node, _attention(ctx.gm, node, q, k, v, scale, summed))


# --- views
# ----------------------------------------------------------------------------------------------------

def _slice_plan(source: fx.Node, dim: int, index: int, result: fx.Node) -> tuple | None:
    """(dim, start, sizes): ``source[..., index, ...]`` on axis ``dim`` as a slice then a reshape to
    ``result``'s shape, where both are static; else None."""
    sizes, size = _sizes(result), recorded_shape(source)[dim]
    if sizes is None or not isinstance(size, int):
        return None
    return dim, index % size, sizes


def _view_plans(node: fx.Node) -> list:
    """[(node to replace, (input, reshape sizes) or (input, slice plan))] for a view XNNPACK does not take."""
    if node.target not in (aten.squeeze.dims, aten.squeeze.dim, aten.unsqueeze.default, aten.select.int,
                           aten.unbind.int):
        return []
    args = bind(node) or {}
    x = args.get("input")
    source = recorded_shape(x)
    if node.target is not aten.select.int and node.target is not aten.unbind.int:
        return [(node, (x, _sizes(node)))] if _sizes(node) else []
    if source is None:
        return []
    if node.target is aten.select.int:
        plan = _slice_plan(x, args["dim"] % len(source), args["index"], node)
        return [(node, (x, plan))] if plan is not None else []
    if not all(u.target is operator.getitem for u in node.users):
        return []
    dim = args["dim"] % len(source)
    plans = [(item, (x, _slice_plan(x, dim, item.args[1], item))) for item in node.users]
    return [(item, plan) for item, plan in plans if plan[1] is not None]


class ViewsAsReshape:
    """``squeeze``/``unsqueeze`` as ``reshape``; ``select`` and ``unbind`` items as ``slice`` then
    ``reshape``."""

    name, phase = "views_as_reshape", PHASE

    def match(self, node, ctx):
        plans = _view_plans(node)
        return Match((node, *(old for old, _ in plans)), plans, "a view as reshape") if plans else None

    def replace(self, match, ctx):
        graph = ctx.graph
        for old, (x, plan) in match.data:
            with graph.inserting_before(old):
                if isinstance(plan, list):  # reshape sizes
                    new = graph.call_function(aten.reshape.default, (x, plan))
                else:
                    dim, start, sizes = plan
                    new = graph.call_function(aten.reshape.default, (
                        graph.call_function(aten.slice.Tensor, (x, dim, start, start + 1)), sizes))
            _replace(ctx, old, new)


# --- layer norm
# -----------------------------------------------------------------------------------------------

FLOAT_TAG = "fxrep_keep_float"


def _tagged_call(graph: fx.Graph, target, args) -> fx.Node:
    """A node that a quantizer should leave in float (``keeps_float``): export keeps ``meta["custom"]``."""
    node = graph.call_function(target, args)
    node.meta["custom"] = {FLOAT_TAG: True}
    return node


def keeps_float(node: fx.Node) -> bool:
    """Whether ``node`` computes statistics that must stay in float (a LayerNorm written with means)."""
    return bool(node.meta.get("custom", {}).get(FLOAT_TAG))


class LayerNormWithLinearMeans:
    """``layer_norm`` over the last axis as ``(x - mean) * rsqrt(var + eps) * w + b``, each mean a Linear with
    one output and weights ``1 / width``. (XNNPACK's own mean reduces the two inner axes of a 4-d tensor in
    NHWC layout, which puts two transposes around every LayerNorm.)"""

    name, phase = "layer_norm_with_linear_means", PHASE

    def match(self, node, ctx):
        if node.target is not aten.layer_norm.default or len(recorded_shape(node) or ()) != 3:
            return None
        args, sizes = bind(node) or {}, _sizes(node)
        if args.get("input") is None or len(args.get("normalized_shape", ())) != 1 or sizes is None:
            return None
        return Match((node,), (args, sizes[-1]), "layer_norm with Linear means")

    def replace(self, match, ctx):
        node, (args, width) = match.nodes[0], match.data
        x, weight, bias, eps = args["input"], args.get("weight"), args.get("bias"), args.get("eps", 1e-5)
        graph = ctx.graph
        call = functools.partial(_tagged_call, graph)
        with graph.inserting_before(node):
            ones = const_node(graph, torch.full((1, width), 1.0 / width, dtype=node.meta["val"].dtype),
                              "xnnpack_mean_weight", owned=True)  # bitwise-equal ones are registered once
            centred = call(aten.sub.Tensor, (x, call(aten.linear.default, (x, ones))))
            var = call(aten.linear.default, (call(aten.mul.Tensor, (centred, centred)), ones))
            out = call(aten.mul.Tensor,
                       (centred, call(aten.rsqrt.default, (call(aten.add.Tensor, (var, eps)),))))
            if weight is not None:
                out = call(aten.mul.Tensor, (out, weight))
            if bias is not None:
                out = call(aten.add.Tensor, (out, bias))
        _replace(ctx, node, out)


# in this order (each sweeps the whole graph): attention first, so the views it writes are already reshapes
PATTERNS = (AttentionAsBmm(), ViewsAsReshape(), LayerNormWithLinearMeans())
