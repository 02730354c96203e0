"""Lifting one recognized attention to fxrep's ``multi_head_attention`` op: decode every chain's head layout,
fold scales and joining coefficients into the q weights, gather q/k/v rows in the merged output's head
order, and verify the result numerically."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from .. import algebra
from ..ir import as_linear, merge_origins
from ..ir.layout import rank
from ..ir.readers import shape_source
from .probe import LayoutMismatch, Probe, ProbeFailed, ShapeMismatch, decode_heads, output_chain, verify
from .recognize import Candidate, Chain, NotAttention

f64 = algebra.f64
PROBE_BATCH, PROBE_TOKENS = 2, 5


@dataclass
class LiftCache:
    """What the lifts of one analysis share: float64 constants, decoded head layouts, verification values,
    the q/k params of joined branches, and the constants registered for them."""

    constants: dict = field(default_factory=dict)
    heads: dict = field(default_factory=dict)
    verified: dict = field(default_factory=dict)
    qk: dict = field(default_factory=dict)
    emitted: dict = field(default_factory=dict)


@dataclass
class LiftedTerm:
    """One ``coef * q @ k^T`` term with its decoded (heads, width) row maps into the q and k Linears."""

    product: fx.Node
    coef: float
    q: Chain
    qmap: torch.Tensor
    k: Chain
    kmap: torch.Tensor


@dataclass
class Lift:
    """A verified lift: ``z`` (the merged-back attention output) becomes
    ``multi_head_attention(x, params)``."""

    x: fx.Node
    z: fx.Node
    params: dict
    heads: int
    dtype: torch.dtype
    nodes: set
    terms: list
    emitted: dict
    qk_width: int
    origins: tuple
    summary: str
    attn_mask: object = None
    is_causal: object = False
    tokens_first: bool = False
    # the output is (batch, tokens) where the input is (tokens, batch), or the reverse
    transpose_out: bool = False


def lift(gm: fx.GraphModule, cand: Candidate, order: dict, cache: LiftCache) -> Lift:
    """``cand`` as a verified ``multi_head_attention`` (decoded and verified on a probe input of its input's
    rank), or NotAttention with the reason. An input of known shape (a, b, d) whose views do not keep (a, b)
    as (batch, tokens) is tried as (tokens, batch): ``torch.export`` writes ``nn.MultiheadAttention`` so."""
    x = cand.value.linear.input
    for t in cand.logits.terms.values():
        if t.q.linear.input is not x or t.k.linear.input is not x:
            raise NotAttention("q, k and v are computed from different tensors (cross-attention)")
    shape, known, exported = _probe_shape(x, cand.value.linear.weight.shape[1])
    try:
        return _lift_batch_first(cand, order, cache, x, shape, known, exported)
    except LayoutMismatch as batch_first:
        if not known or len(shape) != 3:
            raise
        try:
            return _lift_at(cand, order, cache, x, shape, known, tokens_first=True)
        except LayoutMismatch:
            raise batch_first from None


def _lift_batch_first(cand, order, cache, x, shape, known, exported) -> Lift:
    few = shape[:-2] + (min(shape[-2], PROBE_TOKENS), shape[-1])
    if known and not exported and few != shape:  # a few tokens verify the same layout faster, unless the code
        try:  # is sized for the real token count (an exported graph's reshapes spell it as a literal)
            return _lift_at(cand, order, cache, x, few, known)
        except (ProbeFailed, ShapeMismatch):
            pass
    return _lift_at(cand, order, cache, x, shape, known)


def _lift_at(cand: Candidate, order: dict, cache: LiftCache, x: fx.Node, shape: tuple, known: bool,
             tokens_first: bool = False) -> Lift:
    x_probe = torch.zeros(shape, dtype=f64)
    probe = Probe(x, x_probe, order, cache.constants)

    def decode(chain, transposed):  # joined branches read each other's q/k: decode each chain once
        key = (chain.end, transposed, x, shape, tokens_first)
        if key not in cache.heads:
            cache.heads[key] = decode_heads(chain, probe, x_probe, transposed, tokens_first)
        return cache.heads[key]

    vmap = decode(cand.value, False)
    H, dv = vmap.shape
    terms = _lifted_terms(cand, decode, H, order)
    scale = terms[-1].qmap.shape[1] ** -0.5 if cand.scale is None else float(cand.scale)
    folded = len(shape) == 3 and rank(cand.anchor) == 3  # heads folded into the batch (bmm)
    out_tokens_first = tokens_first
    try:
        z, out_nodes, col_head, col_feat = output_chain(cand.anchor, probe, x_probe, H, dv, tokens_first,
                                                        folded)
    except LayoutMismatch:  # (tokens, batch) in and (batch, tokens) out, or the other way round
        if len(shape) != 3:
            raise
        out_tokens_first = not tokens_first
        z, out_nodes, col_head, col_feat = output_chain(cand.anchor, probe, x_probe, H, dv, tokens_first,
                                                        folded, out_tokens_first)
    head_order, feats = _output_heads(col_head, col_feat, H, dv)
    heads = torch.tensor(head_order)
    qk = _qk_params(terms, head_order, heads, scale, probe, cache)
    vw, vb = _gather(probe, cand.value.linear,
                     torch.stack([vmap[h][feats[hp]] for hp, h in enumerate(head_order)]),
                     cand.value.factor)
    params = dict(qk, v_weight=vw.flatten(0, 1), v_bias=vb.flatten(0, 1) if vb is not None else None)
    nodes = cand.nodes() | set(out_nodes)
    stand_ins = {n: v for n, v in ((cand.attn_mask, cand.mask_stand_in), (cand.is_causal, False))
                 if isinstance(n, fx.Node)}
    verify(probe, x, nodes, z, params, H, shape, cache.verified, stand_ins, cand.is_causal is True,
           cand.probe_overrides(), tokens_first, out_tokens_first)
    if not known:
        _verify_extra_axis(probe, x, nodes, z, params, H, shape, cache, stand_ins, cand)
    width = sum(t.qmap.shape[1] for t in terms)
    kind = "joined" if len(cand.logits.terms) > 1 else ("sdpa" if cand.softmax is None else "softmax")
    linears = sorted({n for n in nodes if as_linear(n) is not None}, key=order.__getitem__)
    masked = " with a mask" if cand.attn_mask is not None else ""
    causal = {True: " (causal)", False: ""}.get(cand.is_causal, " (causal when asked)")
    return Lift(x, z, params, H, cand.value.linear.weight.dtype, nodes, terms, cache.emitted, width,
                merge_origins(linears), f"{kind} attention{masked}{causal}, {H} heads (q/k width {width}, "
                f"v width {dv}){' tokens first' if tokens_first else ''} -> multi_head_attention",
                cand.attn_mask, cand.is_causal, tokens_first, out_tokens_first != tokens_first)


def _probe_shape(x: fx.Node, d: int) -> tuple[tuple, bool, bool]:
    """The input's shape from ShapeProp where it is known, else a small (batch, tokens, d); whether it is
    known; whether the graph came from torch.export (its nodes carry fake values, ``meta["val"]``)."""
    source = shape_source(x)
    shape = tuple(source.meta["tensor_meta"].shape) if source is not None else ()
    if len(shape) < 2:
        return (PROBE_BATCH, PROBE_TOKENS, d), False, False
    return shape, True, "val" in source.meta


def _verify_extra_axis(probe, x, nodes, z, params, H, shape, cache, stand_ins, cand) -> None:
    """Without the input's shape, the lift was verified on a (batch, tokens, d) input only, and the lifted op
    treats every leading axis as a batch axis. Code written for any rank (MaxViT folds a window's rows and
    columns into its tokens and restores ``x.shape[:-1]``) returns an output of the op's shape that differs on
    an input with one more axis: that lift is refused. Code that fails on such an input, or returns another
    shape (``B, N, C = x.shape`` unpacks a 3-d shape: fx keeps the reads, not eager Python's rank check), was
    written for 3-d inputs, which the lift was verified on."""
    extra = shape[:1] + (3,) + shape[1:]
    try:
        verify(probe, x, nodes, z, params, H, extra, cache.verified, stand_ins, cand.is_causal is True,
               cand.probe_overrides())
    except (ProbeFailed, ShapeMismatch):
        return
    except NotAttention as e:
        raise NotAttention("the attention computes differently on an input with two leading axes, and its "
                           "input's shape is unknown; pass example_inputs so fxrep sees the real "
                           "shape") from e
    finally:
        probe.shape_sources = {k: cache.verified[(x, shape)][x] for k in probe.shape_sources}


def _lifted_terms(cand: Candidate, decode, H: int, order: dict) -> list:
    """The nonzero logit terms in graph order (a canonical order, so joined branches with equal logits get
    bitwise-equal q/k weights), each with its decoded q and k head maps."""
    terms = []
    for product, t in sorted(cand.logits.terms.items(), key=lambda kv: order[kv[0]]):
        if t.coef == 0.0:
            continue  # a joined branch's own logits at lam == 1 (finite logits: 0 * S == 0 exactly)
        qmap = decode(t.q, False)
        kmap = decode(t.k, t.k_transposed)
        if qmap.shape[0] != H or kmap.shape != qmap.shape:
            raise NotAttention("q, k and v have different head counts or q/k widths")
        terms.append(LiftedTerm(product, t.coef * t.q.factor * t.k.factor, t.q, qmap, t.k, kmap))
    if not terms:
        raise NotAttention("softmax input has no nonzero q @ k^T term")
    return terms


def _output_heads(col_head, col_feat, H: int, dv: int) -> tuple[list, list]:
    """The source head of each block of ``dv`` output columns, and the features it takes from that head."""
    head_order, feats = [], []
    for hp in range(H):
        heads = col_head[hp * dv:(hp + 1) * dv]
        if not (heads == heads[0]).all():
            raise NotAttention("merged output interleaves features of different heads")
        head_order.append(int(heads[0]))
        feats.append(col_feat[hp * dv:(hp + 1) * dv])
    return head_order, feats


def _gather(probe: Probe, lin, index, factor=1.0):
    """Rows ``index`` (heads, d) of the Linear's weight and bias, in float64, times ``factor``. Reads the
    float64 copies the verification probe evaluates the Linear with (converted once per analysis)."""
    w = probe.load(lin.param_node("weight"))[index]
    b = probe.load(lin.param_node("bias"))[index] if lin.bias is not None else None
    if factor != 1.0:  # x * 1.0 == x bitwise: skip the copy
        w, b = w * factor, (b * factor if b is not None else None)
    return w, b


def _qk_params(terms, head_order, heads, scale: float, probe: Probe, cache: LiftCache) -> dict:
    """q/k weights and biases: per head, the terms' rows side by side (q rows scaled by coef * scale). Joined
    branches share their logits, so their q/k params are built once (the same tensors for all of them)."""
    key = (tuple(head_order), scale) + tuple((t.product, t.coef, t.q.linear.node, t.k.linear.node,
                                              t.qmap.numpy().tobytes(), t.kmap.numpy().tobytes())
                                              for t in terms)
    if key not in cache.qk:
        qw, qb, kw, kb = [], [], [], []
        for t in terms:
            for lin, index, factor, ws, bs in ((t.q.linear, t.qmap[heads], t.coef * scale, qw, qb),
                                               (t.k.linear, t.kmap[heads], 1.0, kw, kb)):
                w, b = _gather(probe, lin, index, factor)
                ws.append(w)
                bs.append(b if b is not None else torch.zeros(w.shape[:2], dtype=f64))
        has_qb = any(t.q.linear.bias is not None for t in terms)
        has_kb = any(t.k.linear.bias is not None for t in terms)
        cache.qk[key] = {"q_weight": _stack(qw), "q_bias": _stack(qb) if has_qb else None,
                         "k_weight": _stack(kw), "k_bias": _stack(kb) if has_kb else None}
    return cache.qk[key]


def _stack(parts):
    """(H, d_t, ...) per term -> head-major rows: head, then term, then feature."""
    return torch.cat(parts, dim=1).flatten(0, 1)
