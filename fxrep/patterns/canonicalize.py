"""Canonicalize phase: make every supported op look one way, so the fuse patterns need one handler each.

- ``drop_identity``: Identity, Dropout and DropPath modules and ``F.dropout(training=False)`` are the identity
  at inference; their uses read the input instead. ``.contiguous()`` is dropped only where no reader can
  tell (``ir.layout_sensitive_reader``): before a ``view``, an in-place op or the output it stays.
- ``functionalize_modules``: a module of a class an op spec declares (``nn.Linear``, ``nn.LayerNorm``,
  ``nn.Softmax``, the activations; ``fxrep.ir.known_ops``) becomes the functional call its spec says it stands
  for, on ``get_attr`` parameters (``nn.LayerNorm`` and timm's ``F.layer_norm`` then look the same). An
  in-place activation module (``nn.ReLU(inplace=True)``) becomes an out-of-place call only where nothing else
  can see the write: its input owns its memory and has no other reader.
- ``fold_constants``: an op whose inputs are all constants and whose result is a scalar or a per-channel
  vector (e.g. ``1 - lam`` on a buffer) is evaluated once. Larger constant tables (a position embedding cast
  to another dtype) are left as they are: the user's buffers keep their values and dtypes.
"""

from __future__ import annotations

import torch
from torch import fx

from ..ir import bind, fetch_attr, input_of
from ..ir.build import add_constant
from ..ir.effects import is_inplace, layout_sensitive_reader, write_is_invisible
from ..ir.evaluate import evaluate, load_attribute
from ..ir.opspec import IDENTITY, Attr
from ..ir.readers import dropout_is_identity, is_timm_function
from ..ir.targets import RANDOM_TARGETS, is_identity_module, module_spelling
from ..pattern import Match, Skip


def _is_identity_module(m) -> bool:
    # timm's DropPath is traced through at eval, but may be a leaf under custom tracers; matched by name so
    # that fuse does not import timm
    return is_identity_module(m) or (type(m).__name__ == "DropPath" and not m.training)


def _module(node: fx.Node):
    return fetch_attr(node.graph.owning_module, node.target) if node.op == "call_module" else None


class DropIdentity:
    name = "drop_identity"
    phase = "canonicalize"

    def match(self, node, ctx):
        x = input_of(node)
        if x is None:
            return None
        if node.op == "call_module" and _is_identity_module(_module(node)):
            return Match([node], x, f"{type(_module(node)).__name__} is the identity at eval")
        identity = dropout_is_identity(node)
        if identity is True:
            return Match([node], x, "dropout with training=False")
        if identity is False:
            return Skip([node], "functional dropout is called with training=True: it is random even in "
                                "eval mode; pass training=self.training")
        if (node.op == "call_method" and node.target == "contiguous" and len(node.args) == 1
                and not node.kwargs and layout_sensitive_reader(node) is None):
            return Match([node], x, "contiguous() whose readers do not depend on the layout")
        return None

    def replace(self, match, ctx):
        ctx.replace_node(match.nodes[0], match.data)


class FunctionalizeModules:
    name = "functionalize_modules"
    phase = "canonicalize"

    def match(self, node, ctx):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            return None
        m = _module(node)
        found = module_spelling(m)
        if found is None or found[1] is IDENTITY:
            return None
        if getattr(m, "inplace", False) and not write_is_invisible(node):
            return None  # the write to its input would be visible elsewhere: keep the module call
        return Match([node], found[1](m), f"{type(m).__name__} module -> functional call")

    def replace(self, match, ctx):
        node, call = match.nodes[0], match.data
        g = ctx.graph
        with g.inserting_before(node):
            args, kwargs = fx.node.map_aggregate(
                (call.args, call.kwargs),
                lambda a: g.get_attr(f"{node.target}.{a.name}") if isinstance(a, Attr) else a)
            new = g.call_function(call.target, (node.args[0], *args), kwargs)
        new.meta["fxrep_origin"] = (node.target,)
        ctx.replace_node(node, new)


class FoldConstants:
    name = "fold_constants"
    phase = "canonicalize"

    def match(self, node, ctx):
        if node.op not in ("call_function", "call_method") or node.target in RANDOM_TARGETS:
            return None
        inputs = node.all_input_nodes
        if not inputs or any(i.op != "get_attr" for i in inputs):
            return None
        if is_inplace(node):
            return None  # it would write the user's tensor
        value = evaluate(node, load_attribute)
        if not isinstance(value, torch.Tensor) or sum(1 for s in value.shape if s > 1) > 1:
            # only scalars and per-channel vectors: the constants patterns read; tables stay as is
            return None
        return Match([node], value, f"constant {node.name} evaluated once")

    def replace(self, match, ctx):
        node = match.nodes[0]
        name = add_constant(ctx.gm, match.data, node.name)
        with ctx.graph.inserting_before(node):
            new = ctx.graph.get_attr(name)
        ctx.replace_node(node, new)


class DropEmptyAttentionMask:
    """timm's non-fused attention calls ``maybe_add_mask(scores, resolve_self_attn_mask(N, scores, None,
    False))``: with no mask and ``is_causal=False`` (fixed by tracing) that is ``scores``."""

    name = "drop_empty_attention_mask"
    phase = "canonicalize"

    def match(self, node, ctx):
        if not is_timm_function(node, "maybe_add_mask") or len(node.args) < 1:
            return None
        mask = (bind(node) or {}).get("attn_mask", node.args[1] if len(node.args) > 1 else None)
        if isinstance(mask, fx.Node) and is_timm_function(mask, "resolve_self_attn_mask"):
            args = bind(mask) or {}
            if "attn_mask" in args and args["attn_mask"] is None and args.get("is_causal") is False:
                mask = None
        if mask is None:
            return Match([node], node.args[0], "no attention mask: maybe_add_mask is the identity")
        return None

    def replace(self, match, ctx):
        ctx.replace_node(match.nodes[0], match.data)
