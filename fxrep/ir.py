"""Normalized views of the canonical graph: one accessor per kind of op, so patterns never index args by magic.

After the canonicalize phase every Linear is ``F.linear(x, weight, bias)`` with ``get_attr`` weights, every
LayerNorm is ``F.layer_norm(x, shape, weight, bias, eps)`` and every activation module is its functional form.
The helpers here read those nodes and build new ones; they never mutate existing parameters.
"""

from __future__ import annotations

import hashlib
import operator
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx._symbolic_trace import _assert_is_none

from .ops import multi_head_attention

LINEAR_TARGETS = {F.linear, torch._C._nn.linear}
LAYER_NORM_TARGETS = {F.layer_norm, torch.layer_norm}
SDPA_TARGETS = {F.scaled_dot_product_attention}
SOFTMAX_TARGETS = {F.softmax, torch.softmax, torch.Tensor.softmax}
MATMUL_TARGETS = {operator.matmul, torch.matmul}
ADD_TARGETS = {operator.add, torch.add}
SUB_TARGETS = {operator.sub, torch.sub}
MUL_TARGETS = {operator.mul, torch.mul}
DIV_TARGETS = {operator.truediv, torch.div, torch.true_divide}
NEG_TARGETS = {operator.neg, torch.neg}

# Elementwise activations: (function, name of the argument that selects the variant) -> canonical key.
_ACTIVATION_FUNCTIONS = {
    F.gelu: "gelu", F.relu: "relu", torch.relu: "relu", F.silu: "silu", torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid", torch.tanh: "tanh", F.tanh: "tanh", F.hardswish: "hardswish", F.mish: "mish",
    F.leaky_relu: "leaky_relu", F.elu: "elu",
}
_ACTIVATION_METHODS = {"relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}
_ACTIVATION_VARIANT_ARG = {"gelu": ("approximate", "none"), "leaky_relu": ("negative_slope", 0.01),
                           "elu": ("alpha", 1.0)}


GUARD_TARGETS = {torch._assert, torch._assert_async, _assert_is_none}


def is_guard(node: fx.Node) -> bool:
    """A runtime check with no result (``torch._assert``, fx's ``_assert_is_none`` of a fixed argument):
    never dead code, never folded."""
    return node.op == "call_function" and node.target in GUARD_TARGETS


# Ops that return a view of their first argument (or the argument itself): values unchanged, layout follows.
VIEW_METHODS = {"reshape", "view", "permute", "transpose", "unbind", "unflatten", "flatten", "chunk", "split",
                "contiguous", "swapaxes", "squeeze", "unsqueeze"}
VIEW_FUNCTIONS = {torch.reshape, torch.permute, torch.transpose, torch.unbind, torch.flatten, torch.chunk,
                  torch.split, operator.getitem, torch.swapaxes, torch.squeeze, torch.unsqueeze}
# Readers whose result does not depend on the strides of their input (measured: a permuted input gives the
# same values and a contiguous output; tests/test_ir.py).
LAYOUT_RESETTING = LINEAR_TARGETS | LAYER_NORM_TARGETS
_ELEMENTWISE_METHODS = {"add", "sub", "mul", "div", "neg", "float", "double", "half", "to", "type_as"}
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.imatmul,
                      operator.setitem}


def is_view(node: fx.Node) -> bool:
    """A view op (``reshape``, ``permute``, ``getitem``, ``contiguous``, ...): same values as its input, and
    possibly the same memory."""
    return (node.op == "call_method" and node.target in VIEW_METHODS) or \
        (node.op == "call_function" and node.target in VIEW_FUNCTIONS)


def is_inplace(node: fx.Node) -> bool:
    """Writes to one of its inputs: ``x.add_(y)``, ``x += y``, ``x[i] = y``, ``F.relu(x, inplace=True)``, an
    ``nn.ReLU(inplace=True)`` module call. Such a node is never merged, folded or moved."""
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).endswith("__")
    if node.op == "call_function":
        if node.target in _INPLACE_OPERATORS or node.kwargs.get("inplace") is True:
            return True
        name = getattr(node.target, "__name__", "")
        return (name.endswith("_") and not name.endswith("__")) or _inplace_positional(node)
    if node.op == "call_module":
        return getattr(fetch_attr(node.graph.owning_module, node.target), "inplace", False) is True
    return False


_INPLACE_POSITION = {F.relu: 1, F.silu: 1, F.hardswish: 1, F.mish: 1, F.leaky_relu: 2, F.elu: 2, F.dropout: 3}


def _inplace_positional(node: fx.Node) -> bool:
    i = _INPLACE_POSITION.get(node.target)
    return i is not None and len(node.args) > i and node.args[i] is True


def _is_elementwise(node: fx.Node) -> bool:
    """Elementwise arithmetic and activations: the output takes its layout from the inputs."""
    if node.op == "call_method":
        return node.target in _ELEMENTWISE_METHODS or node.target in _ACTIVATION_METHODS
    return node.op == "call_function" and (
        node.target in ADD_TARGETS | SUB_TARGETS | MUL_TARGETS | DIV_TARGETS | NEG_TARGETS
        or node.target in _ACTIVATION_FUNCTIONS)


def layout_sensitive_reader(node: fx.Node) -> fx.Node | None:
    """The first node that could see the difference if ``node``'s value had other strides, or None.

    Readers are followed through views and elementwise ops (whose outputs inherit their input's layout)
    until an op whose result does not depend on it (Linear, LayerNorm) or a shape read. Anything else counts
    as sensitive: ``view`` (raises on some strides), in-place ops, the graph output (the caller may rely on
    the layout) and every op not classified here."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        for user in n.users:
            if user in seen:
                continue
            seen.add(user)
            if is_shape_read(user) or (is_call(user, LAYOUT_RESETTING) and not is_inplace(user)):
                continue
            if is_inplace(user) or user.op == "output" or (user.op == "call_method" and user.target == "view"):
                return user
            if is_view(user) or _is_elementwise(user):
                todo.append(user)
                continue
            return user
    return None


def owns_its_memory(node) -> bool:
    """True where ``node``'s value is a tensor no other value aliases: the output of a Linear, LayerNorm or
    out-of-place arithmetic. Placeholders, parameters, views and ops that may return their input do not."""
    if not isinstance(node, fx.Node) or is_inplace(node):
        return False
    if node.op == "call_function":
        return node.target in LINEAR_TARGETS | LAYER_NORM_TARGETS | MATMUL_TARGETS | ADD_TARGETS | SUB_TARGETS \
            | MUL_TARGETS | DIV_TARGETS
    if node.op == "call_module":
        return isinstance(fetch_attr(node.graph.owning_module, node.target), (torch.nn.Linear, torch.nn.LayerNorm))
    return False


def _fresh(node: fx.Node) -> bool:
    """The op allocates its result: it can never return (a view of) one of its inputs."""
    return owns_its_memory(node) or (activation_key(node) is not None and node.op == "call_function") or \
        is_softmax(node) or is_call(node, SDPA_TARGETS) or node.target is multi_head_attention


def write_is_invisible(node: fx.Node) -> bool:
    """An in-place op whose write nobody else can see: its target owns its memory and this op is its only
    reader (``nn.ReLU(inplace=True)`` right after a Linear). Such an op may become out-of-place."""
    target = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    return target is not None and owns_its_memory(target) and len(target.users) == 1


def mutation_hazards(graph: fx.Graph) -> set:
    """Nodes that value-based rewrites (CSE, affine forms, merges) must leave alone: every value an in-place
    op writes to, every alias of it (found through ops that may return their input or a view of it, up and
    down the graph), the in-place ops themselves, and every reader of those values (a reader that runs after
    the write sees the written value, so moving or merging it changes its result).

    The written value is a hazard even where the write is invisible today: a rewrite that replaced it (say,
    by a CSE'd equal value) would redirect the write into a value others read. Only the in-place op itself is
    left out where its write is invisible, so that ``functionalize_modules`` can make it out-of-place."""
    inplace = [n for n in graph.nodes if is_inplace(n)]
    aliases: set = set()
    todo = inplace + [n.args[0] for n in inplace if n.args and isinstance(n.args[0], fx.Node)]
    while todo:
        n = todo.pop()
        if n in aliases:
            continue
        aliases.add(n)
        if n.op in ("call_function", "call_method", "call_module") and not _fresh(n):
            todo += [a for a in n.all_input_nodes if a.op != "get_attr" or is_inplace(n)]
        todo += [u for u in n.users if u.op != "output" and not _fresh(u)]
    hazards = aliases | {u for n in aliases for u in n.users}
    return hazards - {n for n in inplace if write_is_invisible(n)}


def is_call(node: fx.Node, targets) -> bool:
    return node.op == "call_function" and node.target in targets


def is_softmax(node) -> bool:
    """``F.softmax`` / ``torch.softmax`` / ``x.softmax(...)`` (nn.Softmax is functionalized to the first)."""
    return isinstance(node, fx.Node) and (is_call(node, SOFTMAX_TARGETS) or
                                          (node.op == "call_method" and node.target == "softmax"))


def constant_tensor(node) -> torch.Tensor | None:
    """The tensor behind a ``get_attr`` node, or None."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = fetch_attr(node.graph.owning_module, node.target)
        if isinstance(value, torch.Tensor):
            return value
    return None


def fetch_attr(module: torch.nn.Module, target: str):
    obj = module
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


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


@dataclass
class LinearView:
    node: fx.Node
    input: fx.Node
    weight: torch.Tensor
    bias: torch.Tensor | None

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def param_node(self, name: str) -> fx.Node | None:
        """The ``get_attr`` node of the ``weight`` or ``bias``."""
        _, w, b = _linear_args(self.node)
        return w if name == "weight" else b


def _linear_args(node: fx.Node) -> tuple:
    """(input, weight, bias) arguments of an ``F.linear`` call, positional or keyword."""
    args = list(node.args) + [None] * (3 - len(node.args))
    return args[0], node.kwargs.get("weight", args[1]), node.kwargs.get("bias", args[2])


def as_linear(node) -> LinearView | None:
    """``F.linear(x, W, b)`` with constant W (and b) as a LinearView, else None."""
    if not (isinstance(node, fx.Node) and is_call(node, LINEAR_TARGETS)):
        return None
    x, w, b = _linear_args(node)
    wt = constant_tensor(w)
    if not isinstance(x, fx.Node) or wt is None or wt.dim() != 2:
        return None
    bt = None
    if b is not None:
        bt = constant_tensor(b)
        if bt is None:
            return None
    return LinearView(node, x, wt, bt)


@dataclass
class LayerNormView:
    node: fx.Node
    input: fx.Node
    normalized_shape: tuple
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float


def as_layer_norm(node) -> LayerNormView | None:
    if not (isinstance(node, fx.Node) and is_call(node, LAYER_NORM_TARGETS)):
        return None
    names = ["input", "normalized_shape", "weight", "bias", "eps"]
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    x = bound.get("input")
    shape = bound.get("normalized_shape")
    if isinstance(shape, int):
        shape = (shape,)
    if not isinstance(x, fx.Node) or not isinstance(shape, (tuple, list, torch.Size)):
        return None
    if any(not isinstance(s, int) for s in shape):
        return None
    w, b = bound.get("weight"), bound.get("bias")
    wt = constant_tensor(w) if w is not None else None
    bt = constant_tensor(b) if b is not None else None
    if (w is not None and wt is None) or (b is not None and bt is None):
        return None
    return LayerNormView(node, x, tuple(shape), wt, bt, float(bound.get("eps", 1e-5)))


def activation_key(node) -> tuple | None:
    """A hashable key naming an elementwise activation and its variant, e.g. ('gelu', 'tanh'); else None."""
    if not isinstance(node, fx.Node) or len(node.all_input_nodes) != 1 or is_inplace(node):
        return None
    if node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS:
        name = _ACTIVATION_FUNCTIONS[node.target]
    elif node.op == "call_method" and node.target in _ACTIVATION_METHODS:
        name = _ACTIVATION_METHODS[node.target]
    else:
        return None
    if not isinstance(node.args[0], fx.Node):
        return None
    variant_arg, default = _ACTIVATION_VARIANT_ARG.get(name, (None, None))
    extra = [a for a in node.args[1:]]
    variant = node.kwargs.get(variant_arg, extra[0] if extra and variant_arg else default)
    if any(isinstance(a, fx.Node) for a in extra) or isinstance(variant, fx.Node):
        return None
    return (name, variant)


def attention_view(node) -> dict | None:
    """The arguments of an fxrep ``multi_head_attention`` node as a dict of tensors, else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is multi_head_attention):
        return None
    x, qw, qb, kw, kb, vw, vb = node.args[:7]
    tensors = {k: constant_tensor(v) if v is not None else None
               for k, v in zip(("q_weight", "q_bias", "k_weight", "k_bias", "v_weight", "v_bias"),
                               (qw, qb, kw, kb, vw, vb))}
    if tensors["q_weight"] is None or tensors["k_weight"] is None or tensors["v_weight"] is None:
        return None
    tensors["input"] = x
    tensors["num_heads"] = node.kwargs["num_heads"]
    return tensors


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


# --------------------------------------------------------------------------------------------------------
# Building new nodes
# --------------------------------------------------------------------------------------------------------

_NAME_RE = re.compile(r"[^0-9a-zA-Z_]")


def fingerprint(value: torch.Tensor) -> tuple:
    """A cheap hash of a tensor's bytes: bitwise-equal tensors have equal fingerprints. The converse does not
    hold for large tensors (only 4096 evenly spaced words are hashed): callers compare with ``bitwise_equal``."""
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
    base = "fx_" + _NAME_RE.sub("_", hint).strip("_")[:60] or "fx_const"
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    if not owned or not value.is_contiguous():
        value = value.clone(memory_format=torch.contiguous_format)  # also densifies expanded (stride-0) tensors
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
    """A constant of ``dtype`` holding ``t``: cast (a new tensor, so owned) or, in ``dtype`` already, registered
    as is when ``owned`` (the caller made it for this node), else copied if it is not a duplicate."""
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
                   hint: str, origins=(), emitted: dict | None = None, owned=()) -> fx.Node:
    """A ``multi_head_attention`` node. ``emitted`` (id of a param -> (param, attribute name)) lets
    several calls that share param tensors register each one once; ``owned`` names the params the caller
    made for this node (see ``emit_linear``)."""
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
    node = graph.call_function(multi_head_attention, tuple(args), {"num_heads": int(num_heads)})
    node.meta["fxrep_origin"] = tuple(origins)
    return node


def emit_split_heads(graph: fx.Graph, t: fx.Node, num_heads: int) -> fx.Node:
    """(..., N, H * d) -> (..., H, N, d): head-major features, as SDPA wants them."""
    return graph.call_method("transpose", (graph.call_method("unflatten", (t, -1, (num_heads, -1))), -3, -2))


def is_shape_read(node: fx.Node) -> bool:
    """``x.shape`` / ``x.ndim`` / ``x.size()`` / ``x.dim()``: reads metadata only, never values."""
    return (node.op == "call_function" and node.target is getattr and node.args[1:2] in (("shape",), ("ndim",))) \
        or (node.op == "call_method" and node.target in ("size", "dim"))
