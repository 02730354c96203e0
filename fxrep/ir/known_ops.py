"""The ops fxrep understands, one ``OpSpec`` each (``fxrep.ir.opspec`` says what the fields promise).

Every table the passes read is derived from ``OPS``: the readers' target tables (``fxrep.ir.targets``), the
module-to-function rewrite (``functionalize_modules``), the ATen-to-torch rewrite
(``fxrep.frontend.spellings.TABLE``) and row pruning's rules (``fxrep.export.rows.rules.RULES``). An op not
declared here is opaque: patterns leave it and the values it reads alone.

Adding an elementwise activation is one entry here plus its tests; CELU, for instance, is::

    activation("celu", (F.celu, torch.celu), module=nn.CELU, aten=(aten.celu.default,),
               variants=(("alpha", 1.0),)),

and ``tests/test_activations.py`` then fuses each of its spellings (module, function, exported).
"""

from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx
from torch.fx._symbolic_trace import _assert_is_none

from .opspec import DROP, IDENTITY, Attr, Call, OpSpec, activation, same
from .recorded import recorded_shape

aten = torch.ops.aten


# --- ATen converters whose arguments are not a plain renaming ---------------------------------------------

def _softmax(a):
    if a.get("half_to_float"):
        return None
    return (a["input"], a["dim"]), ({"dtype": a["dtype"]} if a.get("dtype") is not None else {})


def _dropout(a):
    if not a["train"] or a["p"] == 0:
        return IDENTITY
    return (a["input"], a["p"]), {"training": True}  # random: F.dropout is a random op


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
        return Call(with_alpha, (a["input"], a["other"]), {"alpha": alpha})
    return convert


def _rsub(a):
    return ((a["other"], a["input"]), {}) if a.get("alpha", 1) == 1 else None


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
        return Call("contiguous", (a["input"],))
    layout = a.get("memory_format")
    return (a["input"],), ({"memory_format": layout} if layout is not None else {})


def _contiguous(a):
    # the schema's default arrives as the enum's integer (0, contiguous_format)
    fmt = a.get("memory_format")
    keep = isinstance(fmt, torch.memory_format) and fmt != torch.contiguous_format
    return (a["input"],), ({"memory_format": fmt} if keep else {})


def _expand(a):
    return None if a.get("implicit") else ((a["input"], a["size"]), {})


def _view(name, functions=(), methods=None, aten=None, rows=None) -> OpSpec:
    return OpSpec(name, functions, (name,) if methods is None else methods, aten=aten or {}, view=True,
                  rows=rows)


def _aten_only(*ops, **properties) -> OpSpec:
    """Overloads fxrep knows by their properties alone: no torch-level spelling is read."""
    return OpSpec(str(ops[0]).split(".")[1], aten={op: None for op in ops}, **properties)


# --- the declarations ---------------------------------------------------------------------------------------

_LINEAR = OpSpec(
    "linear", (F.linear,),  # F.linear is torch._C._nn.linear
    modules={nn.Linear: lambda m: Call(F.linear, (Attr("weight"), Attr("bias") if m.bias is not None
                                                  else None))},
    aten={aten.linear.default: same("input", "weight", "bias")}, layout_resetting=True, rows="linear")

_LAYER_NORM = OpSpec(
    "layer_norm", (F.layer_norm, torch.layer_norm),
    modules={nn.LayerNorm: lambda m: Call(F.layer_norm, (tuple(m.normalized_shape),), {
        "weight": Attr("weight") if m.weight is not None else None,
        "bias": Attr("bias") if m.bias is not None else None, "eps": m.eps})},
    aten={aten.layer_norm.default: same("input", "normalized_shape", "weight", "bias", "eps")},
    layout_resetting=True, rows="layer_norm")

_ATTENTION = (
    OpSpec("softmax", (torch.softmax, F.softmax, torch.Tensor.softmax), ("softmax",),
           modules={nn.Softmax: lambda m: Call(F.softmax, (), {"dim": m.dim})},
           aten={aten.softmax.int: _softmax, aten._softmax.default: _softmax}, rows="softmax"),
    OpSpec("scaled_dot_product_attention", (F.scaled_dot_product_attention,),
           aten={aten.scaled_dot_product_attention.default: same(
               "query", "key", "value", attn_mask="attn_mask", dropout_p="dropout_p", is_causal="is_causal",
               scale="scale", enable_gqa="enable_gqa")}, rows="attention"),
    OpSpec("matmul", (operator.matmul, torch.matmul, torch.bmm), ("matmul", "bmm"),  # bmm: of 3-d tensors
           aten={aten.matmul.default: same("input", "other", to=torch.matmul),
                 aten.bmm.default: same("input", "mat2", to=torch.bmm)}, rows="matmul"),
    OpSpec("mm", (torch.mm,), aten={aten.mm.default: same("input", "mat2")}),
)

_ARITHMETIC = (
    OpSpec("add", (operator.add, torch.add), ("add",), elementwise=True,
           aten={aten.add.Tensor: _arith(torch.add), aten.add.Scalar: _arith(torch.add)}),
    OpSpec("sub", (operator.sub, torch.sub), ("sub",), elementwise=True,
           aten={aten.sub.Tensor: _arith(torch.sub), aten.rsub.Scalar: _rsub, aten.sub.Scalar: None}),
    OpSpec("mul", (operator.mul, torch.mul), ("mul",), elementwise=True,
           aten={aten.mul.Tensor: _arith(None), aten.mul.Scalar: _arith(None)}),
    OpSpec("div", (operator.truediv, torch.div, torch.true_divide), ("div",), elementwise=True,
           aten={aten.div.Tensor: _arith(None), aten.div.Scalar: _arith(None)}),
    OpSpec("neg", (operator.neg, torch.neg), ("neg",), aten={aten.neg.default: None}, elementwise=True),
)

ACTIVATIONS = (
    activation("gelu", (F.gelu,), module=nn.GELU, aten=(aten.gelu.default,),
               variants=(("approximate", "none"),)),
    activation("relu", (F.relu, torch.relu), methods=("relu",), module=nn.ReLU, aten=(aten.relu.default,)),
    activation("silu", (F.silu,), module=nn.SiLU, aten=(aten.silu.default,)),
    activation("sigmoid", (torch.sigmoid, F.sigmoid), methods=("sigmoid",), module=nn.Sigmoid,
               aten=(aten.sigmoid.default,)),
    activation("tanh", (torch.tanh, F.tanh), methods=("tanh",), module=nn.Tanh, aten=(aten.tanh.default,)),
    activation("hardswish", (F.hardswish,), module=nn.Hardswish, aten=(aten.hardswish.default,)),
    activation("mish", (F.mish,), module=nn.Mish, aten=(aten.mish.default,)),
    activation("leaky_relu", (F.leaky_relu,), module=nn.LeakyReLU, aten=(aten.leaky_relu.default,),
               variants=(("negative_slope", 0.01),)),
    activation("elu", (F.elu,), module=nn.ELU, aten=(aten.elu.default,), variants=(("alpha", 1.0),),
               aten_condition=lambda a: a.get("scale", 1) == 1 and a.get("input_scale", 1) == 1),
    activation("celu", (F.celu, torch.celu), module=nn.CELU, aten=(aten.celu.default,),
               variants=(("alpha", 1.0),)),
    activation("softplus", (F.softplus,), module=nn.Softplus, aten=(aten.softplus.default,),
               variants=(("beta", 1.0), ("threshold", 20.0))),
    activation("hardsigmoid", (F.hardsigmoid,), module=nn.Hardsigmoid, aten=(aten.hardsigmoid.default,)),
)

_CASTS_AND_COPIES = (
    OpSpec("to", (), ("to",), aten={aten.to.dtype: _to_dtype}, elementwise=True),
    OpSpec("float", (), ("float", "double", "half"), elementwise=True),
    OpSpec("type_as", (), ("type_as",), elementwise=True),
    OpSpec("clone", (torch.clone,), ("clone",), aten={aten.clone.default: _clone}, elementwise=True),
    _aten_only(aten._to_copy.default, elementwise=True),
)

_VIEWS = (
    _view("view", methods=("view",), aten={aten.view.default: same("input", "size")}, rows="view"),
    _view("reshape", (torch.reshape,), aten={aten.reshape.default: same("input", "shape"),
                                             aten._unsafe_view.default: same("input", "size")}, rows="view"),
    _view("permute", (torch.permute,), aten={aten.permute.default: same("input", "dims")}, rows="permute"),
    _view("transpose", (torch.transpose,), aten={aten.transpose.int: same("input", "dim0", "dim1")},
          rows="transpose"),
    _view("t", (torch.t,)),
    _view("swapaxes", (torch.swapaxes,), rows="transpose"),
    _view("movedim", (torch.movedim, torch.moveaxis), ("movedim", "moveaxis")),
    _view("unbind", (torch.unbind,), aten={aten.unbind.int: same("input", "dim")}),
    _view("select", (torch.select,), aten={aten.select.int: same("input", "dim", "index")}),
    _view("narrow", (torch.narrow,), aten={aten.slice.Tensor: _slice,
                                           aten.narrow.default: same("input", "dim", "start", "length")},
          rows="narrow"),
    _view("getitem", (operator.getitem,), methods=()),
    _view("split", (torch.split,), aten={aten.split.Tensor: same("input", "split_size", "dim"),
                                         aten.split_with_sizes.default: same("input", "split_sizes", "dim")}),
    _view("chunk", (torch.chunk,), aten={aten.chunk.default: same("input", "chunks", "dim")}),
    _view("unsqueeze", (torch.unsqueeze,), aten={aten.unsqueeze.default: same("input", "dim")},
          rows="unsqueeze"),
    _view("squeeze", (torch.squeeze,), aten={aten.squeeze.dim: same("input", "dim"),
                                             aten.squeeze.dims: same("input", "dim")}),
    _view("unflatten", (torch.unflatten,), aten={aten.unflatten.int: same("input", "dim", "sizes")},
          rows="unflatten"),
    _view("flatten", (torch.flatten,), aten={aten.flatten.using_ints: same("input", "start_dim", "end_dim")},
          rows="flatten"),
    # contiguous() returns its input where it is contiguous already (a view), else a copy (elementwise)
    OpSpec("contiguous", (), ("contiguous",), aten={aten.contiguous.default: _contiguous}, view=True,
           elementwise=True),
    OpSpec("expand", (), ("expand",), aten={aten.expand.default: _expand}),
    OpSpec("alias", aten={aten.alias.default: lambda a: IDENTITY}, elementwise=True),
    OpSpec("identity", modules={nn.Identity: IDENTITY}),
)

_OTHERS = (
    OpSpec("dropout", (F.dropout, torch.dropout),
           modules={cls: IDENTITY for cls in (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                                              nn.AlphaDropout)},
           aten={aten.dropout.default: _dropout}, random=True, rows="dropout"),
    OpSpec("stack", (torch.stack,), aten={aten.stack.default: same("tensors", "dim")}),
    OpSpec("sum", (torch.sum,), ("sum",),
           aten={aten.sum.dim_IntList: same("input", "dim", "keepdim", dtype="dtype")}, rows="reduction"),
    OpSpec("mean", (torch.mean,), ("mean",),
           aten={aten.mean.dim: same("input", "dim", "keepdim", dtype="dtype")}, rows="reduction"),
    OpSpec("size", (), ("size",), aten={aten.sym_size.int: same("input", "dim")}),
    OpSpec("assert", (torch._assert, torch._assert_async, _assert_is_none), guard=True,
           # export's check of a tensor's dtype/shape before a ``.to``: exporting the fused graph checks again
           aten={aten._assert_tensor_metadata.default: lambda a: DROP}),
    _aten_only(aten.cat.default, rows="cat"),
    _aten_only(aten.where.self, elementwise=True),
    _aten_only(aten.maximum.default, elementwise=True),
    _aten_only(aten.minimum.default, elementwise=True),
    _aten_only(aten.exp.default, elementwise=True),
    _aten_only(aten.erf.default, elementwise=True),
    _aten_only(aten.sqrt.default, elementwise=True),
    _aten_only(aten.rsqrt.default, elementwise=True),
    _aten_only(aten.pow.Tensor_Scalar, elementwise=True),
    _aten_only(aten.hardtanh.default, elementwise=True),
    *(OpSpec(f.__name__, (f,), random=True) for f in (
        torch.rand, torch.randn, torch.randint, torch.rand_like, torch.randn_like, torch.bernoulli,
        torch.normal, torch.multinomial, torch.randperm)),
)

#: every op fxrep understands
OPS: tuple = (_LINEAR, _LAYER_NORM, *_ATTENTION, *_ARITHMETIC, *ACTIVATIONS, *_CASTS_AND_COPIES, *_VIEWS,
              *_OTHERS)
