"""Readers of canonical ops: one function per kind of op, returning a typed view or None. Patterns read
nodes only through these, never by indexing ``node.args``.

After the canonicalize phase every Linear is ``F.linear(x, weight, bias)`` with ``get_attr`` weights, every
LayerNorm is ``F.layer_norm(x, shape, weight, bias, eps)`` and every activation module is its functional form;
the readers also accept the other spellings listed in ``ir.targets``. Arguments are bound by ``ir.binding``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from .binding import bind, input_of
from .targets import (
    ACTIVATION_FUNCTIONS,
    ACTIVATION_METHODS,
    ACTIVATION_VARIANTS,
    ARITHMETIC,
    DROPOUT_TARGETS,
    LAYER_NORM_TARGETS,
    LINEAR_TARGETS,
    SDPA_TARGETS,
    is_op,
)


def is_call(node: fx.Node, targets) -> bool:
    return node.op == "call_function" and node.target in targets


def _bound_call(node, targets) -> dict | None:
    """The bound arguments of a ``call_function`` node whose target is one of ``targets``, else None."""
    if not (isinstance(node, fx.Node) and is_call(node, targets)):
        return None
    return bind(node)


def fetch_attr(module: torch.nn.Module, target: str):
    obj = module
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def constant_tensor(node) -> torch.Tensor | None:
    """The tensor behind a ``get_attr`` node, or None."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = fetch_attr(node.graph.owning_module, node.target)
        if isinstance(value, torch.Tensor):
            return value
    return None


def scalar_constant(a) -> float | None:
    """A Python number or a 0-d floating ``get_attr`` tensor as a float, else None (bools are not numbers)."""
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return float(a)
    t = constant_tensor(a)
    if t is not None and t.dim() == 0 and t.is_floating_point():
        return float(t)
    return None


def scalar_or_channel(value, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """A constant that acts on the last dim only, as a float64 0-d (scalar) or 1-d (per channel) tensor.

    Accepts Python numbers and ``get_attr`` tensors of shape (), (k,) or (1, ..., 1, k). Anything that would
    broadcast over other dims, or change the result dtype by type promotion, gives None.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return torch.tensor(float(value), dtype=torch.float64)
    t = constant_tensor(value)
    if t is None or not t.is_floating_point():
        return None
    if t.dim() > 0 and dtype is not None and t.dtype != dtype:
        return None
    if t.numel() == 1 and all(s == 1 for s in t.shape):
        if t.dim() > 0:
            return None  # shape (1,)/(1,1) would broadcast the rank; keep it simple and exact
        return t.detach().to(torch.float64).reshape(())
    if t.dim() >= 1 and all(s == 1 for s in t.shape[:-1]):
        return t.detach().to(torch.float64).reshape(-1)
    return None


# -- arithmetic -------------------------------------------------------------------------------------------

def arith_kind(node: fx.Node) -> str | None:
    """'add', 'sub', 'mul', 'div' (true division only) or 'neg' for elementwise arithmetic in any spelling
    (operator, ``torch.*``, method), else None."""
    for kind, functions, method in ARITHMETIC:
        if (node.op == "call_function" and node.target in functions) or \
                (node.op == "call_method" and node.target == method):
            if kind == "div" and node.kwargs.get("rounding_mode") is not None:
                return None
            return kind
    return None


def scale_op(node: fx.Node) -> tuple[fx.Node, float] | None:
    """(data input, factor) if ``node`` multiplies or divides one tensor by a scalar constant, else None."""
    kind = arith_kind(node)
    if kind not in ("mul", "div") or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    sa, sb = scalar_constant(a), scalar_constant(b)
    if kind == "mul" and isinstance(a, fx.Node) and sb is not None and sa is None:
        return a, sb
    if kind == "mul" and isinstance(b, fx.Node) and sa is not None:
        return b, sa
    if kind == "div" and isinstance(a, fx.Node) and sb not in (None, 0.0):
        return a, 1.0 / sb
    return None


_METADATA = (("shape",), ("ndim",), ("dtype",), ("device",))


def is_shape_read(node: fx.Node) -> bool:
    """``x.shape`` / ``x.ndim`` / ``x.dtype`` / ``x.device`` / ``x.size()`` / ``x.dim()``: reads metadata
    only, never values (a value with the same shape, dtype and device may stand in)."""
    return (node.op == "call_function" and node.target is getattr and node.args[1:2] in _METADATA) \
        or (node.op == "call_method" and node.target in ("size", "dim"))


# -- Linear, LayerNorm, activations, softmax, SDPA, dropout -------------------------------------------------

@dataclass
class LinearView:
    node: fx.Node
    input: fx.Node
    weight: torch.Tensor
    bias: torch.Tensor | None
    weight_node: fx.Node
    bias_node: fx.Node | None

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def param_node(self, name: str) -> fx.Node | None:
        """The ``get_attr`` node of the ``weight`` or ``bias``."""
        return self.weight_node if name == "weight" else self.bias_node


def as_linear(node) -> LinearView | None:
    """``F.linear(x, W, b)`` with constant W (and b) as a LinearView, else None."""
    args = _bound_call(node, LINEAR_TARGETS)
    if args is None:
        return None
    x, w, b = args.get("input"), args.get("weight"), args.get("bias")
    wt = constant_tensor(w)
    if not isinstance(x, fx.Node) or wt is None or wt.dim() != 2:
        return None
    bt = None
    if b is not None:
        bt = constant_tensor(b)
        if bt is None:
            return None
    return LinearView(node, x, wt, bt, w, b)


@dataclass
class LayerNormView:
    node: fx.Node
    input: fx.Node
    normalized_shape: tuple
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float


def shape_source(node: fx.Node) -> fx.Node | None:
    """The node whose ShapeProp shape (``meta["tensor_meta"]``) ``node`` has: itself, or the input of
    LayerNorms fxrep built after ShapeProp ran (a LayerNorm keeps its input's shape); None where unknown."""
    while not hasattr(node.meta.get("tensor_meta"), "shape"):
        ln = as_layer_norm(node)
        if ln is None:
            return None
        node = ln.input
    return node


def known_shape(node: fx.Node) -> tuple | None:
    """``node``'s shape as ShapeProp recorded it (see ``shape_source``), or None."""
    source = shape_source(node)
    return tuple(source.meta["tensor_meta"].shape) if source is not None else None


def as_layer_norm(node) -> LayerNormView | None:
    """``F.layer_norm``/``torch.layer_norm`` with constant (or no) affine and a literal shape, or a computed
    one (``x.shape[-1:]``) where the affine's shape fixes it; else None."""
    args = _bound_call(node, LAYER_NORM_TARGETS)
    if args is None:
        return None
    x, shape = args.get("input"), args.get("normalized_shape")
    w, b = args.get("weight"), args.get("bias")
    wt = constant_tensor(w) if w is not None else None
    bt = constant_tensor(b) if b is not None else None
    if (w is not None and wt is None) or (b is not None and bt is None):
        return None
    computed = isinstance(shape, fx.Node) or \
        (isinstance(shape, (tuple, list)) and any(isinstance(s, fx.Node) for s in shape))
    if computed and (wt is not None or bt is not None):
        # computed (``x.shape[-1:]``): F.layer_norm requires it to equal the affine's shape
        shape = tuple((wt if wt is not None else bt).shape)
    if isinstance(shape, int):
        shape = (shape,)
    if not isinstance(x, fx.Node) or not isinstance(shape, (tuple, list, torch.Size)):
        return None
    if any(not isinstance(s, int) for s in shape):
        return None
    eps = args.get("eps", 1e-5)
    if not isinstance(eps, (int, float)):
        return None
    return LayerNormView(node, x, tuple(shape), wt, bt, float(eps))


def activation_key(node) -> tuple | None:
    """A hashable key naming an elementwise activation and its variant, e.g. ('gelu', 'tanh'), else None. The
    variant is the value of the spec's variant argument (a tuple where it has several, None where none).
    In-place calls are not activations here: they write their input."""
    if not isinstance(node, fx.Node) or len(node.all_input_nodes) != 1:
        return None
    if node.op == "call_function" and node.target in ACTIVATION_FUNCTIONS:
        name = ACTIVATION_FUNCTIONS[node.target]
    elif node.op == "call_method" and node.target in ACTIVATION_METHODS:
        name = ACTIVATION_METHODS[node.target]
    else:
        return None
    args = bind(node)
    if args is None or input_of(node) is None or args.get("inplace") is True:
        return None
    values = tuple(args.get(arg, default) for arg, default in ACTIVATION_VARIANTS[name])
    if any(isinstance(v, fx.Node) for v in values):
        return None
    return (name, values[0] if len(values) == 1 else (values or None))


def is_softmax(node) -> bool:
    """``F.softmax`` / ``torch.softmax`` / ``x.softmax(...)`` (nn.Softmax is functionalized to the first)."""
    return isinstance(node, fx.Node) and is_op(node, "softmax")


@dataclass
class SoftmaxView:
    node: fx.Node
    input: fx.Node
    dim: object
    dtype: object


def as_softmax(node) -> SoftmaxView | None:
    if not is_softmax(node):
        return None
    args = bind(node)
    if args is None or not isinstance(args.get("input"), fx.Node):
        return None
    return SoftmaxView(node, args["input"], args.get("dim"), args.get("dtype"))


_FLOAT_CAST_METHODS = {"float": torch.float32, "double": torch.float64, "half": torch.float16,
                       "bfloat16": torch.bfloat16}


def as_float_cast(node) -> fx.Node | None:
    """The input of a cast between floating dtypes (``x.to(torch.float32)``, ``x.to(q.dtype)``,
    ``x.type_as(q)``, ``x.float()``), else None. A ``.to`` with a device, or a tensor argument, is not one."""
    if not (isinstance(node, fx.Node) and node.op == "call_method" and node.args
            and isinstance(node.args[0], fx.Node)):
        return None
    if node.target in _FLOAT_CAST_METHODS and len(node.args) == 1 and not node.kwargs:
        return node.args[0]
    if node.target == "type_as" and len(node.args) == 2 and not node.kwargs:
        return node.args[0]
    if node.target == "to" and len(node.args) == 2 and not node.kwargs:
        dtype = node.args[1]
        if (isinstance(dtype, torch.dtype) and dtype.is_floating_point) or \
                (isinstance(dtype, fx.Node) and dtype.op == "call_function" and dtype.target is getattr
                 and dtype.args[1:] == ("dtype",)):
            return node.args[0]
    return None


@dataclass
class SdpaView:
    node: fx.Node
    query: fx.Node
    key: fx.Node
    value: fx.Node
    attn_mask: object
    dropout_p: object
    is_causal: object
    scale: object
    enable_gqa: object


def as_sdpa(node) -> SdpaView | None:
    """``F.scaled_dot_product_attention`` with its arguments bound (defaults filled in), else None."""
    args = _bound_call(node, SDPA_TARGETS)
    if args is None:
        return None
    return SdpaView(node, args["query"], args["key"], args["value"], args.get("attn_mask"),
                    args.get("dropout_p", 0.0), args.get("is_causal", False), args.get("scale"),
                    args.get("enable_gqa", False))


def dropout_is_identity(node) -> bool | None:
    """For a functional dropout: True when it is the identity (``training=False`` or ``p == 0``), False when
    it is random; None for any other node."""
    if not (isinstance(node, fx.Node) and is_call(node, DROPOUT_TARGETS)):
        return None
    args = bind(node) or {}
    training = args.get("training", args.get("train", True))  # F.dropout: training; torch.dropout: train
    return training is False or args.get("p", 0.5) == 0


def is_timm_function(node, name: str) -> bool:
    """A call of ``timm.layers.attention.<name>`` (timm wraps its mask helpers as fx leaves)."""
    t = node.target if isinstance(node, fx.Node) and node.op == "call_function" else None
    return getattr(t, "__module__", "") == "timm.layers.attention" and getattr(t, "__name__", "") == name


def as_masked_scores(node) -> tuple | None:
    """(scores, mask) for timm's ``maybe_add_mask(scores, mask)`` (``scores + mask``, or ``scores`` when the
    mask is None at run time), else None."""
    if not is_timm_function(node, "maybe_add_mask"):
        return None
    args = bind(node)
    if args is None or not isinstance(args.get("scores"), fx.Node):
        return None
    return args["scores"], args.get("attn_mask")


# -- where nodes came from --------------------------------------------------------------------------------

def origin(node: fx.Node) -> tuple[str, ...]:
    """Where a node came from in the user's model: module qualnames (from fxrep's own bookkeeping or the
    tracer's ``nn_module_stack``), else the node name."""
    if "fxrep_origin" in node.meta:
        return tuple(node.meta["fxrep_origin"])
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return (str(path),)
    return (node.name,)


def merge_origins(nodes) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for n in nodes:
        for o in origin(n):
            seen.setdefault(o, None)
    return tuple(seen)
