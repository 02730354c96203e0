"""Unit tests of the recognition layer (fxrep.ir): every spelling each reader accepts, and the near misses it
must refuse. The end-to-end tests show that fuse works; these show why, one reader at a time."""

import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import fx
from torch.fx.operator_schemas import normalize_function

from fxrep import ir
from fxrep.ir import build, effects, products, readers
from fxrep.ir.targets import LAYOUT_RESETTING, LINEAR_TARGETS
from fxrep.numerics import layer_norm_error_bound, matmul_error_bound


class Params(nn.Module):
    """A module with the constants the readers look for, and a ``forward`` given per test."""

    def __init__(self, fn, d=4):
        super().__init__()
        self.fn = fn
        self.w = nn.Parameter(torch.randn(3, d))
        self.b = nn.Parameter(torch.randn(3))
        self.g = nn.Parameter(torch.randn(d))
        self.beta = nn.Parameter(torch.randn(d))
        self.register_buffer("s", torch.tensor(0.5))
        self.register_buffer("v", torch.randn(d))
        self.register_buffer("m", torch.randn(2, d))

    def forward(self, x):
        return self.fn(self, x)


def last_call(fn, d=4):
    """The last op node of ``fn(module, x)`` traced with torch.fx."""
    gm = fx.symbolic_trace(Params(fn, d))
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")][-1]


# -- bind ---------------------------------------------------------------------------------------------------

@given(n_positional=st.integers(1, 5), data=st.data())
def test_bind_agrees_with_torch_normalize_function_for_layer_norm(n_positional, data):
    names = ["input", "normalized_shape", "weight", "bias", "eps"]
    values = ["x", (4,), "w", "b", data.draw(st.floats(1e-8, 1e-2))]
    graph = fx.Graph()
    ph = {k: graph.placeholder(k) for k in ("x", "w", "b")}
    values = [ph.get(v, v) if isinstance(v, str) else v for v in values]
    keep = data.draw(st.lists(st.booleans(), min_size=5 - n_positional, max_size=5 - n_positional))
    args = tuple(values[:n_positional])
    kwargs = {k: v for k, v, k_ in zip(names[n_positional:], values[n_positional:], keep)
              if k_ or k == "normalized_shape"}
    node = graph.call_function(F.layer_norm, args, kwargs)
    want = normalize_function(F.layer_norm, args, kwargs, normalize_to_only_use_kwargs=True).kwargs
    assert ir.bind(node) == dict(want)


@pytest.mark.parametrize("fn, expected", [
    (lambda m, x: F.linear(x, m.w), {"bias": None}),
    (lambda m, x: torch._C._nn.linear(x, m.w, m.b), {}),
    (lambda m, x: F.softmax(x, dim=-1), {"dim": -1, "dtype": None}),
    (lambda m, x: torch.softmax(x, -1, torch.float32), {"dim": -1, "dtype": torch.float32}),
    (lambda m, x: x.softmax(-1), {"dim": -1}),
    (lambda m, x: F.scaled_dot_product_attention(x, x, x, None, 0.0, True),
     {"is_causal": True, "scale": None}),
    (lambda m, x: torch.add(x, x, alpha=2), {"alpha": 2}),
    (lambda m, x: F.relu(x, True), {"inplace": True}),
    (lambda m, x: F.dropout(x, 0.1, False), {"p": 0.1, "training": False, "inplace": False}),
])
def test_bind_names_arguments_in_every_spelling(fn, expected):
    bound = ir.bind(last_call(fn))
    assert bound is not None and expected.items() <= bound.items()


def test_bind_refuses_what_it_cannot_name():
    graph = fx.Graph()
    x = graph.placeholder("x")
    assert ir.bind(graph.call_function(lambda a: a, (x,))) is not None  # a Python function: its signature
    assert ir.bind(graph.call_module("m", (x,))) is None


# -- Linear, LayerNorm ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn, has_bias", [
    (lambda m, x: F.linear(x, m.w, m.b), True),
    (lambda m, x: F.linear(x, m.w), False),
    (lambda m, x: F.linear(x, weight=m.w, bias=m.b), True),
    (lambda m, x: F.linear(input=x, weight=m.w, bias=None), False),
    (lambda m, x: torch._C._nn.linear(x, m.w, m.b), True),
])
def test_as_linear_accepts(fn, has_bias):
    lin = ir.as_linear(last_call(fn))
    assert lin is not None and lin.out_features == 3 and (lin.bias is not None) == has_bias
    assert lin.param_node("weight").op == "get_attr"


@pytest.mark.parametrize("fn", [
    lambda m, x: F.linear(x, m.w * 2, m.b),        # weight computed, not a constant
    lambda m, x: F.linear(x, m.w, m.b * 2),        # bias computed
    lambda m, x: F.linear(x, x[:3], None),         # weight from the input
    lambda m, x: x @ m.w.t(),                      # a matmul, not a Linear
])
def test_as_linear_refuses(fn):
    assert ir.as_linear(last_call(fn)) is None


@pytest.mark.parametrize("fn, affine, eps", [
    (lambda m, x: F.layer_norm(x, (4,), m.g, m.beta, 1e-6), True, 1e-6),
    (lambda m, x: F.layer_norm(x, (4,)), False, 1e-5),
    (lambda m, x: F.layer_norm(x, [4], weight=m.g, bias=m.beta, eps=1e-3), True, 1e-3),
    (lambda m, x: torch.layer_norm(x, (4,), m.g, m.beta, 1e-4), True, 1e-4),
    (lambda m, x: F.layer_norm(x, x.shape[-1:], m.g, m.beta, 1e-4), True, 1e-4),    # computed shape
    (lambda m, x: F.layer_norm(x, (x.size(-1),), None, m.beta), True, 1e-5),         # implied by the bias
    (lambda m, x: F.layer_norm(x, m.g.shape, m.g), True, 1e-5),                      # implied by the weight
])
def test_as_layer_norm_accepts(fn, affine, eps):
    ln = ir.as_layer_norm(last_call(fn))
    assert ln is not None and ln.normalized_shape == (4,) and ln.eps == eps
    assert (ln.weight is not None or ln.bias is not None) == affine


@pytest.mark.parametrize("fn", [
    lambda m, x: F.layer_norm(x, x.shape[-1:]),                # computed shape, no affine to fix it
    lambda m, x: F.layer_norm(x, (4,), m.g * 2, m.beta),       # weight computed
])
def test_as_layer_norm_refuses(fn):
    assert ir.as_layer_norm(last_call(fn)) is None


# -- activations ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn, key", [
    (lambda m, x: F.gelu(x), ("gelu", "none")),
    (lambda m, x: F.gelu(x, approximate="tanh"), ("gelu", "tanh")),
    (lambda m, x: F.relu(x), ("relu", None)),
    (lambda m, x: torch.relu(x), ("relu", None)),
    (lambda m, x: x.relu(), ("relu", None)),
    (lambda m, x: F.silu(x), ("silu", None)),
    (lambda m, x: F.leaky_relu(x, 0.2), ("leaky_relu", 0.2)),
    (lambda m, x: F.elu(x, alpha=2.0), ("elu", 2.0)),
    (lambda m, x: torch.tanh(x), ("tanh", None)),
])
def test_activation_key_accepts(fn, key):
    assert ir.activation_key(last_call(fn)) == key


@pytest.mark.parametrize("fn", [
    lambda m, x: F.relu(x, inplace=True),
    lambda m, x: F.relu(x, True),            # in place, positionally
    lambda m, x: F.silu(x, inplace=True),
    lambda m, x: x + x,                      # not an activation
    lambda m, x: torch.relu(x + m.v) * x,    # the last node is the product
])
def test_activation_key_refuses(fn):
    assert ir.activation_key(last_call(fn)) is None


# -- arithmetic, scales, matmul, einsum, softmax, SDPA ----------------------------------------------------

@pytest.mark.parametrize("fn, kind", [
    (lambda m, x: x + 1, "add"), (lambda m, x: torch.add(x, x), "add"), (lambda m, x: x.add(x), "add"),
    (lambda m, x: x - m.v, "sub"), (lambda m, x: torch.sub(x, 1.0), "sub"), (lambda m, x: x.sub(x), "sub"),
    (lambda m, x: x * 2, "mul"), (lambda m, x: torch.mul(x, m.v), "mul"), (lambda m, x: x.mul(2), "mul"),
    (lambda m, x: x / 2, "div"), (lambda m, x: torch.div(x, 2), "div"), (lambda m, x: x.div(2), "div"),
    (lambda m, x: -x, "neg"), (lambda m, x: torch.neg(x), "neg"), (lambda m, x: x.neg(), "neg"),
    (lambda m, x: torch.div(x, 2, rounding_mode="floor"), None), (lambda m, x: x // 2, None),
    (lambda m, x: x @ x.t(), None),
])
def test_arith_kind_classifies_every_spelling(fn, kind):
    assert ir.arith_kind(last_call(fn)) == kind


@pytest.mark.parametrize("fn, factor", [
    (lambda m, x: x * 0.5, 0.5), (lambda m, x: 0.5 * x, 0.5), (lambda m, x: x / 4, 0.25),
    (lambda m, x: x * m.s, 0.5), (lambda m, x: x.mul(3), 3.0),
])
def test_scale_op_reads_scalar_scales(fn, factor):
    found = readers.scale_op(last_call(fn))
    assert found is not None and found[0].op == "placeholder" and found[1] == factor


@pytest.mark.parametrize("fn", [
    lambda m, x: x * m.v,          # per channel, not a scalar
    lambda m, x: x * x,            # not a constant
    lambda m, x: x / 0,            # no finite factor
    lambda m, x: 2 / x,            # the tensor divides
    lambda m, x: x * True,         # a bool is not a scale
])
def test_scale_op_refuses(fn):
    assert readers.scale_op(last_call(fn)) is None


@pytest.mark.parametrize("eq, kind", [
    ("bhqd,bhkd->bhqk", "logits"), ("abcd,abed->abce", "logits"), ("bhqk,bhkd->bhqd", "pv"),
    ("bhqd,bhdk->bhqk", "pv"), ("bhqd,bhkd->bhkq", None), ("bhqd,bhqd->bhqd", None),
    ("...qd,...kd->...qk", None),
    ("bqd,bkd->bqk", None),
])
def test_einsum_kind(eq, kind):
    graph = fx.Graph()
    a, b = graph.placeholder("a"), graph.placeholder("b")
    assert products.einsum_kind(graph.call_function(torch.einsum, (eq, a, b))) == kind


def test_softmax_and_sdpa_views():
    sm = ir.as_softmax(last_call(lambda m, x: torch.softmax(x, -1, torch.float32)))
    assert sm.dim == -1 and sm.dtype is torch.float32
    assert ir.as_softmax(last_call(lambda m, x: x.softmax(dim=3))).dim == 3
    assert ir.as_softmax(last_call(lambda m, x: F.softmax(x, -1))).dtype is None
    sdpa = ir.as_sdpa(last_call(lambda m, x: F.scaled_dot_product_attention(x, x, x, scale=0.5)))
    assert sdpa.attn_mask is None and sdpa.is_causal is False and sdpa.scale == 0.5 and sdpa.dropout_p == 0.0
    assert ir.as_sdpa(last_call(lambda m, x: F.softmax(x, -1))) is None


@pytest.mark.parametrize("fn, identity", [
    (lambda m, x: F.dropout(x, 0.1, False), True), (lambda m, x: F.dropout(x, p=0.0), True),
    (lambda m, x: F.dropout(x, training=False), True), (lambda m, x: torch.dropout(x, 0.1, False), True),
    (lambda m, x: F.dropout(x, 0.1), False), (lambda m, x: torch.dropout(x, 0.1, True), False),
    (lambda m, x: x * 2, None),
])
def test_dropout_is_identity(fn, identity):
    assert readers.dropout_is_identity(last_call(fn)) is identity


@pytest.mark.parametrize("value, expected", [
    (2, 2.0), (0.5, 0.5), (True, None), ("s", 0.5), ("v", None), (None, None),
])
def test_scalar_constant(value, expected):
    gm = fx.symbolic_trace(Params(lambda m, x: x))
    for name in ("s", "v"):
        gm.register_buffer(name, getattr(Params(lambda m, x: x), name))
    if isinstance(value, str):
        value = gm.graph.get_attr(value)
    assert readers.scalar_constant(value) == expected


# -- effects ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn, inplace", [
    (lambda m, x: x.add_(1), True),
    (lambda m, x: F.relu(x, inplace=True), True), (lambda m, x: F.relu(x, True), True),
    (lambda m, x: F.dropout(x, 0.1, False, True), True), (lambda m, x: torch.relu_(x), True),
    (lambda m, x: x.add(1), False), (lambda m, x: F.relu(x), False), (lambda m, x: x.__add__(1), False),
])
def test_is_inplace(fn, inplace):
    assert effects.is_inplace(last_call(fn)) is inplace


def test_inplace_operators_are_inplace():
    graph = fx.Graph()
    x = graph.placeholder("x")
    assert effects.is_inplace(graph.call_function(operator.iadd, (x, 1)))
    assert effects.is_inplace(graph.call_function(operator.setitem, (x, 0, 1.0)))
    assert not effects.is_inplace(graph.call_function(operator.add, (x, 1)))


def test_mutation_hazards_cover_aliases_and_later_readers():
    def fn(m, x):
        y = F.linear(x, m.w)
        z = y.view(-1)         # an alias of y
        y.mul_(2)              # written in place
        return z + 1, F.linear(x, m.w)

    gm = fx.symbolic_trace(Params(fn))
    names = {n.name for n in effects.mutation_hazards(gm.graph)}
    assert {"linear", "view", "mul_", "add"} <= names and "linear_1" not in names


@pytest.mark.parametrize("shape", [(4, 6), (3, 5, 6), (197, 192)])
@pytest.mark.parametrize("target", sorted(LAYOUT_RESETTING, key=str))
def test_layout_resetting_ops_do_not_see_their_input_strides(target, shape):
    """The measurement behind ir.targets.LAYOUT_RESETTING: a transposed input gives a contiguous output and
    the same values up to the op's summation order, which may differ by kernel and machine: each result is
    within the op's rounding error bound of the float64 value (fxrep.numerics, docs/numerics.md)."""
    d = shape[-1]
    strided = torch.randn(*shape[:-2], d, shape[-2]).transpose(-1, -2)
    if target in LINEAR_TARGETS:
        w, b = torch.randn(3, d), torch.randn(3)
        args, exact = (w, b), target(strided.double(), w.double(), b.double())
        bound = matmul_error_bound(strided, w.T, b)
    else:
        g, beta = torch.randn(d), torch.randn(d)
        args, exact = ((d,), g, beta), target(strided.double(), (d,), g.double(), beta.double())
        bound = layer_norm_error_bound(strided, g, beta, 1e-5)
    out, ref = target(strided, *args), target(strided.contiguous(), *args)
    assert ((out.double() - exact).abs() <= bound).all() and ((ref.double() - exact).abs() <= bound).all()
    assert out.is_contiguous()


def test_layout_sensitive_reader():
    def fn(m, x):
        y = (x + 1).contiguous()
        return F.linear(y * 2, m.w), y.transpose(0, 1).view(-1)

    gm = fx.symbolic_trace(Params(fn))
    contiguous = next(n for n in gm.graph.nodes if n.target == "contiguous")
    reader = effects.layout_sensitive_reader(contiguous)
    assert reader is not None and reader.target == "view"

    gm = fx.symbolic_trace(Params(lambda m, x: F.linear((x + 1).contiguous() * 2, m.w)))
    contiguous = next(n for n in gm.graph.nodes if n.target == "contiguous")
    assert effects.layout_sensitive_reader(contiguous) is None


# -- builders ---------------------------------------------------------------------------------------------

def test_add_constant_reuses_bitwise_equal_tensors_only():
    gm = fx.symbolic_trace(Params(lambda m, x: x))
    t = torch.tensor([0.0, 1.0])
    a = build.add_constant(gm, t, "c")
    assert build.add_constant(gm, t.clone(), "c") == a
    assert build.add_constant(gm, torch.tensor([-0.0, 1.0]), "c") != a     # -0.0 is other bits
    assert build.add_constant(gm, t.double(), "c") != a                    # other dtype
    name = build.fresh_attribute_name(gm, a)
    assert name.startswith(a + "_") and not hasattr(gm, name)
    assert build.fresh_attribute_name(gm, "new") == "new"
