"""Building new nodes and constants. Existing parameters are never mutated: every constant fxrep makes is
registered under a fresh name (or reuses a bitwise-equal one fxrep registered before)."""

from __future__ import annotations

import hashlib
import re

import torch
import torch.nn.functional as F
from torch import fx

from ..ops import multi_head_attention, repeat_mask_heads
from .readers import fetch_attr

_NAME_RE = re.compile(r"[^0-9a-zA-Z_]")


def fingerprint(value: torch.Tensor) -> tuple:
    """A cheap hash of a tensor's bytes: bitwise-equal tensors have equal fingerprints. The converse does not
    hold for large tensors (only 4096 evenly spaced words are hashed): callers compare with
    ``bitwise_equal``."""
    raw = value.reshape(-1).contiguous().cpu().view(torch.uint8)
    if raw.numel() <= 1 << 15:
        return (hashlib.sha1(raw.numpy()).hexdigest(),)
    words = raw[: raw.numel() // 8 * 8].view(torch.int64)
    sample = words[:: max(1, words.numel() // 4096)].contiguous()
    return (hashlib.sha1(sample.numpy()).hexdigest(), bytes(raw[-8:].numpy()))


_BITS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (unlike ``torch.equal``: NaN equals NaN, -0.0 differs from 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    bits = _BITS.get(a.element_size(), torch.uint8)
    return torch.equal(a.reshape(-1).contiguous().view(bits), b.reshape(-1).contiguous().view(bits))


def fresh_attribute_name(module: torch.nn.Module, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``, ... : the first name ``module`` has no attribute of."""
    name, i = base, 0
    while hasattr(module, name):
        i += 1
        name = f"{base}_{i}"
    return name


def add_constant(gm: fx.GraphModule, tensor: torch.Tensor, hint: str, owned: bool = False) -> str:
    """Register ``tensor`` on ``gm`` under a fresh, readable attribute name and return that name.

    A tensor bitwise equal to one fxrep registered before gets that one's name: identical merged weights
    then give identical nodes, which common-subexpression elimination merges. The tensor is copied unless
    ``owned`` says the caller made it for this purpose and holds no other reference to it.
    """
    cache = gm.meta.setdefault("fxrep_constants", {})
    value = tensor.detach()
    key = (value.dtype, tuple(value.shape), fingerprint(value))
    for name in cache.get(key, ()):
        if hasattr(gm, name) and bitwise_equal(fetch_attr(gm, name), value):
            return name
    name = fresh_attribute_name(gm, "fx_" + _NAME_RE.sub("_", hint).strip("_")[:60] or "fx_const")
    if not owned or not value.is_contiguous():
        # also densifies expanded (stride-0) tensors
        value = value.clone(memory_format=torch.contiguous_format)
    if value.is_floating_point():
        gm.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))
    else:
        gm.register_buffer(name, value)
    cache.setdefault(key, []).append(name)
    return name


def const_node(graph: fx.Graph, tensor: torch.Tensor, hint: str, owned: bool = False) -> fx.Node:
    gm = graph.owning_module
    name = add_constant(gm, tensor, hint, owned)
    return graph.get_attr(name)


def _param_node(graph: fx.Graph, t: torch.Tensor, dtype: torch.dtype, hint: str, owned: bool) -> fx.Node:
    """A constant of ``dtype`` holding ``t``: cast (a new tensor, so owned) or, in ``dtype`` already,
    registered as is when ``owned`` (the caller made it for this node), else copied if it is not a
    duplicate."""
    if t.dtype != dtype:
        return const_node(graph, t.to(dtype), hint, owned=True)
    return const_node(graph, t, hint, owned=owned)


def emit_linear(graph: fx.Graph, x: fx.Node, weight: torch.Tensor, bias: torch.Tensor | None,
                dtype: torch.dtype, hint: str, origins=(), owned: bool = False) -> fx.Node:
    """``F.linear(x, weight, bias)`` with new constants cast to ``dtype`` (algebra was done in float64).
    ``owned``: weight and bias were made by the caller for this node and are not referenced elsewhere."""
    w = _param_node(graph, weight, dtype, hint + "_weight", owned)
    b = _param_node(graph, bias, dtype, hint + "_bias", owned) if bias is not None else None
    node = graph.call_function(F.linear, (x, w, b))
    node.meta["fxrep_origin"] = tuple(origins)
    return node


def emit_attention(graph: fx.Graph, x: fx.Node, params: dict, num_heads: int, dtype: torch.dtype,
                   hint: str, origins=(), emitted: dict | None = None, owned=(), attn_mask=None,
                   is_causal=False, mask_repeats: int = 1, tokens_first: bool = False) -> fx.Node:
    """A ``multi_head_attention`` node. ``emitted`` (id of a param -> (param, attribute name)) lets
    several calls that share param tensors register each one once; ``owned`` names the params the caller
    made for this node (see ``emit_linear``). The mask arguments are SDPA's (nodes or constants)."""
    args = [x]
    emitted = {} if emitted is None else emitted
    for key in ("q_weight", "q_bias", "k_weight", "k_bias", "v_weight", "v_bias"):
        t = params.get(key)
        if t is None:
            args.append(None)
        elif id(t) in emitted and hasattr(graph.owning_module, emitted[id(t)][1]):
            args.append(graph.get_attr(emitted[id(t)][1]))
        else:
            node = _param_node(graph, t, dtype, f"{hint}_{key}", key in owned)
            emitted[id(t)] = (t, node.target)
            args.append(node)
    kwargs = {"num_heads": int(num_heads)}
    for name, value, default in (("attn_mask", attn_mask, None), ("is_causal", is_causal, False),
                                 ("mask_repeats", mask_repeats, 1), ("tokens_first", tokens_first, False)):
        if isinstance(value, fx.Node) or value != default:  # defaults stay implicit: the code reads as before
            kwargs[name] = value
    node = graph.call_function(multi_head_attention, tuple(args), kwargs)
    node.meta["fxrep_origin"] = tuple(origins)
    return node


def emit_split_heads(graph: fx.Graph, t: fx.Node, num_heads: int) -> fx.Node:
    """(..., N, H * d) -> (..., H, N, d): head-major features, as SDPA wants them."""
    return graph.call_method("transpose", (graph.call_method("unflatten", (t, -1, (num_heads, -1))), -3, -2))


def sdpa_masking(graph: fx.Graph, att) -> dict:
    """SDPA keyword arguments of an attention op (an ``AttentionView``), with the scale folded into q: a
    per-head mask is tiled by ``ops.repeat_mask_heads`` (a node at the insertion point) where the op widened
    branches that share it. No mask and no causal flag give ``{'scale': 1.0}`` only."""
    kwargs = {}
    if att.attn_mask is not None:
        mask = att.attn_mask
        if att.mask_repeats != 1:
            mask = graph.call_function(repeat_mask_heads, (mask, att.mask_repeats))
        kwargs["attn_mask"] = mask
    if isinstance(att.is_causal, fx.Node) or att.is_causal:
        kwargs["is_causal"] = att.is_causal
    kwargs["scale"] = 1.0
    return kwargs
