"""ATen spellings (``torch.export`` graphs) rewritten to the torch-level spellings the readers know.

A graph from ``torch.export`` (``ExportedProgram.module()``) calls ATen overloads: ``aten.linear.default``,
``aten.layer_norm.default``, ``aten.softmax.int``, ``aten.view.default``. Each has one torch-level function
with the same meaning and, up to names, the same arguments. The front-end pattern ``ATEN_TO_TORCH`` replaces
every overload of the table below by that function (arguments bound on the overload's schema), so one pattern
sees one spelling whatever captured the graph. A core ATen graph (``run_decompositions()``) has its Linear,
batched matmul and LayerNorm decompositions folded back first (``core_aten``). Overloads not in the table stay
as they are: the readers treat them as opaque ops, exactly as any unknown function.

``TABLE`` maps an overload to ``(target, convert)``: ``target`` is a torch function, or a method name (a
``str``, called on the first argument); ``convert(a)`` takes the bound arguments (a dict keyed by the
schema's names, the first one ``input``) and returns ``(args, kwargs)`` for ``target``, or None to leave the
node alone. ``IDENTITY`` marks overloads that return their input's values (``alias``, eval-mode ``dropout``):
their uses read the input instead; ``DROP`` marks checks without users that are left out.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from ..ir import bind
from ..ir.activations import ACTIVATION_ATEN
from ..ir.recorded import recorded_shape
from ..pattern import FRONTEND, Match

aten = torch.ops.aten
IDENTITY, DROP = object(), object()


@dataclass
class _Call:
    """A converter's call of another target than its table entry's."""

    target: object
    args: tuple
    kwargs: dict


def _same(*names, **renamed):
    """Positional arguments ``names`` in order, then keyword arguments ``{new: bound[old]}``."""
    def convert(a):
        return tuple(a[n] for n in names), {new: a[old] for new, old in renamed.items()}
    return convert


def _softmax(a):
    if a.get("half_to_float"):
        return None
    return (a["input"], a["dim"]), ({"dtype": a["dtype"]} if a.get("dtype") is not None else {})


def _dropout(a):
    if not a["train"] or a["p"] == 0:
        return IDENTITY
    return (a["input"], a["p"]), {"training": True}  # random: F.dropout is in RANDOM_TARGETS


def _to_dtype(a):
    return None if a["copy"] or a["memory_format"] is not None else ((a["input"], a["dtype"]), {})


def _arith(with_alpha):
    """``a op b`` as the Python operator (it takes a number on either side, as ATen's ``.Tensor`` overloads
    do); with ``alpha`` other than 1, ``torch.add/sub(a, b, alpha=)`` where ``a`` is a tensor."""
    def convert(a):
        alpha = a.get("alpha", 1)
        if alpha == 1:
            return (a["input"], a["other"]), {}
        if with_alpha is None or not isinstance(a["input"], fx.Node):
            return None
        return _Call(with_alpha, (a["input"], a["other"]), {"alpha": alpha})
    return convert


def _slice(a):
    """``x[start:end]`` along ``dim`` with step 1 as ``torch.narrow`` (a view), where the size is known;
    negative and out-of-range bounds are resolved as Python slicing resolves them."""
    x, start, end = a["input"], a.get("start"), a.get("end")
    size = recorded_shape(x)
    if a.get("step", 1) != 1 or size is None:
        return None
    dim = a.get("dim", 0) % len(size)
    n = size[dim]
    if not isinstance(n, int) or not isinstance(start if start is not None else 0, int) or \
            not isinstance(end if end is not None else n, int):
        return None
    start, end, _ = slice(start, end).indices(n)
    return (x, dim, start, max(end - start, 0)), {}


def _clone(a):
    # a contiguous copy is how core ATen spells ``reshape`` of a permuted tensor: read it as ``contiguous()``
    if a.get("memory_format") == torch.contiguous_format:
        return _Call("contiguous", (a["input"],), {})
    layout = a.get("memory_format")
    return (a["input"],), ({"memory_format": layout} if layout is not None else {})


def _contiguous(a):
    # the schema's default arrives as the enum's integer (0, contiguous_format)
    fmt = a.get("memory_format")
    keep = isinstance(fmt, torch.memory_format) and fmt != torch.contiguous_format
    return (a["input"],), ({"memory_format": fmt} if keep else {})


def _expand(a):
    return None if a.get("implicit") else ((a["input"], a["size"]), {})


TABLE: dict = {
    aten.linear.default: (F.linear, _same("input", "weight", "bias")),
    aten.layer_norm.default: (F.layer_norm, _same("input", "normalized_shape", "weight", "bias", "eps")),
    aten.scaled_dot_product_attention.default: (
        F.scaled_dot_product_attention,
        _same("query", "key", "value", attn_mask="attn_mask", dropout_p="dropout_p", is_causal="is_causal",
              scale="scale", enable_gqa="enable_gqa")),
    aten.softmax.int: (torch.softmax, _softmax),
    aten._softmax.default: (torch.softmax, _softmax),
    **{op: (spec.functions[0], spec.aten_call) for op, spec in ACTIVATION_ATEN.items()},
    aten.view.default: ("view", _same("input", "size")),
    aten.reshape.default: (torch.reshape, _same("input", "shape")),
    aten._unsafe_view.default: (torch.reshape, _same("input", "size")),
    aten.permute.default: (torch.permute, _same("input", "dims")),
    aten.transpose.int: (torch.transpose, _same("input", "dim0", "dim1")),
    aten.unbind.int: (torch.unbind, _same("input", "dim")),
    aten.select.int: (torch.select, _same("input", "dim", "index")),
    aten.split.Tensor: (torch.split, _same("input", "split_size", "dim")),
    aten.split_with_sizes.default: (torch.split, _same("input", "split_sizes", "dim")),
    aten.chunk.default: (torch.chunk, _same("input", "chunks", "dim")),
    aten.unsqueeze.default: (torch.unsqueeze, _same("input", "dim")),
    aten.squeeze.dim: (torch.squeeze, _same("input", "dim")),
    aten.squeeze.dims: (torch.squeeze, _same("input", "dim")),
    aten.unflatten.int: (torch.unflatten, _same("input", "dim", "sizes")),
    aten.flatten.using_ints: (torch.flatten, _same("input", "start_dim", "end_dim")),
    aten.expand.default: ("expand", _expand),
    aten.contiguous.default: ("contiguous", _contiguous),
    aten.clone.default: (torch.clone, _clone),
    aten.alias.default: (None, lambda a: IDENTITY),
    aten.dropout.default: (F.dropout, _dropout),
    aten.sym_size.int: ("size", _same("input", "dim")),
    aten.to.dtype: ("to", _to_dtype),
    # export's check of a tensor's dtype/shape before a ``.to``: exporting the fused graph checks again
    aten._assert_tensor_metadata.default: (None, lambda a: DROP),
    aten.add.Tensor: (operator.add, _arith(torch.add)),
    aten.sub.Tensor: (operator.sub, _arith(torch.sub)),
    aten.mul.Tensor: (operator.mul, _arith(None)),
    aten.div.Tensor: (operator.truediv, _arith(None)),
    aten.add.Scalar: (operator.add, _arith(torch.add)),
    aten.mul.Scalar: (operator.mul, _arith(None)),
    aten.div.Scalar: (operator.truediv, _arith(None)),
    aten.rsub.Scalar: (operator.sub,
                       lambda a: ((a["other"], a["input"]), {}) if a.get("alpha", 1) == 1 else None),
    aten.slice.Tensor: (torch.narrow, _slice),
    aten.stack.default: (torch.stack, _same("tensors", "dim")),
    aten.sum.dim_IntList: (torch.sum, _same("input", "dim", "keepdim", dtype="dtype")),
    aten.mean.dim: (torch.mean, _same("input", "dim", "keepdim", dtype="dtype")),
    aten.matmul.default: (torch.matmul, _same("input", "other")),
    aten.bmm.default: (torch.bmm, _same("input", "mat2")),
    aten.mm.default: (torch.mm, _same("input", "mat2")),
}


# keyword arguments left out where they have the torch-level function's default (the schema binds them all)
_DEFAULTS = {"alpha": 1, "approximate": "none", "attn_mask": None, "dropout_p": 0.0, "is_causal": False,
             "scale": None, "enable_gqa": False, "dtype": None, "memory_format": None}


class AtenToTorch:
    """The front-end pattern that rewrites each ATen overload of ``TABLE`` to its torch-level spelling. The
    new node keeps the old one's ``meta`` (shapes, stack trace); the engine erases the old one."""

    name, phase = "aten_to_torch", FRONTEND

    def match(self, node, ctx):
        if node.op != "call_function" or node.target not in TABLE:
            return None
        bound = bind(node)
        call = TABLE[node.target][1](bound) if bound is not None else None
        if call is None or (call is DROP and node.users):
            return None
        return Match((node,), data=(bound, call), summary=f"{node.target} in its torch spelling")

    def replace(self, match, ctx):
        node, (bound, call) = match.nodes[0], match.data
        if call is DROP:
            ctx.remove(node)
            return
        if call is IDENTITY:
            ctx.replace_node(node, ctx.resolve(bound["input"]))
            return
        target = TABLE[node.target][0]
        if isinstance(call, _Call):
            target, call = call.target, (call.args, call.kwargs)
        args, kwargs = fx.node.map_arg(call, ctx.resolve)
        kwargs = {k: v for k, v in kwargs.items() if k not in _DEFAULTS or v != _DEFAULTS[k]}
        with ctx.graph.inserting_before(node):
            new = (ctx.graph.call_method(target, args, kwargs) if isinstance(target, str)
                   else ctx.graph.call_function(target, args, kwargs))
        new.meta = dict(node.meta)
        ctx.replace_node(node, new)


ATEN_TO_TORCH = AtenToTorch()
