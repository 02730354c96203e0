"""fxrep.export.xnnpack: the ATen rewrites made before ExecuTorch lowers a program compute what the program
computes (hypothesis over attention shapes, shared keys, head sums and scales), leave near misses alone, keep
a dynamic batch dynamic, and leave the input program unchanged. Run in PyTorch; the lowering itself is tested
at the end and in test_mobile.py."""

import collections

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.export import Dim

from fxrep.equivalence import relative_error
from fxrep.export.xnnpack import rewrite_for_xnnpack
from fxrep.numerics import MODEL_RTOL

aten = torch.ops.aten
SETTINGS = settings(max_examples=25, deadline=None)


def _ops(program) -> collections.Counter:
    return collections.Counter(n.target for n in program.graph.nodes if n.op == "call_function")


class Attention(torch.nn.Module):
    """Attention over (batch, heads, tokens, dim) tensors, in the spellings fxrep's fused models and timm
    use."""

    def __init__(self, key: str, head_sum: bool, scale):
        super().__init__()
        self.key, self.head_sum, self.scale = key, head_sum, scale

    def forward(self, q, x, v):
        if self.key == "expand_as":  # fxrep's rank-aware form: the block input is every head's key
            if q.shape[-2] == x.shape[-2]:
                k = x.unsqueeze(-3).expand_as(q)
            else:
                k = x.unsqueeze(1).expand(-1, q.shape[1], -1, -1)
        elif self.key == "broadcast":
            k = x.unsqueeze(-3)
        else:
            k = x.unflatten(-1, (q.shape[1], -1)).transpose(1, 2)[..., : q.shape[-1]]
        o = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return o.sum(-3) if self.head_sum else o * 2


@st.composite
def attention_case(draw):
    b, h = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    n, m = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    d, dv = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    key = draw(st.sampled_from(["expand_as", "broadcast", "per_head"]))
    scale = draw(st.sampled_from([None, 1.0, 0.37]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    q = torch.randn(b, h, n, d, generator=g)
    x = torch.randn(b, m, d if key != "per_head" else h * d, generator=g)
    v = torch.randn(b, h, m, dv, generator=g)
    return Attention(key, draw(st.booleans()), scale), (q, x, v)


@SETTINGS
@given(attention_case())
def test_attention_as_bmm_computes_what_sdpa_computes(case):
    model, inputs = case
    program = torch.export.export(model, inputs)
    rewritten = rewrite_for_xnnpack(program, inputs)
    ops = _ops(rewritten)
    assert aten.scaled_dot_product_attention.default not in ops and ops[aten.bmm.default] == 2
    if model.key != "per_head":  # the shared key is read once, not copied for every head
        assert aten.expand.default not in ops and aten.expand_as.default not in ops
    if model.head_sum:  # the sum over heads is part of the second product
        assert aten.sum.dim_IntList not in ops
    assert relative_error(model(*inputs), rewritten.module()(*inputs)) <= MODEL_RTOL[torch.float32]


class SplitLinearAttention(torch.nn.Module):
    """fxrep's rank-aware attention as it is exported: q and v are Linears whose features split into heads
    (unflatten, then heads before tokens), every head's key is the block input, the heads are summed. Near
    misses: q given as a tensor (no Linear to read its (token, head) order from), values from a Linear wider
    than dv (applying it after the product would cost more), values split (dv, heads) instead of (heads,
    dv)."""

    def __init__(self, heads: int, d: int, dv: int, dy: int, bias: bool, scale, near_miss: str | None):
        super().__init__()
        self.heads, self.scale, self.near_miss = heads, scale, near_miss
        self.q = torch.nn.Linear(d, heads * d, bias=bias)
        self.v = torch.nn.Linear(dy, heads * dv, bias=bias)

    def forward(self, x, y):
        h = self.heads
        q = self.q(x).unflatten(-1, (h, -1)).transpose(-3, -2)
        if self.near_miss == "q_tensor":
            q = q.contiguous() * 1.5
        v = self.v(y)
        if self.near_miss == "dv_major":
            v = v.unflatten(-1, (-1, h)).transpose(-1, -2)
        else:
            v = v.unflatten(-1, (h, -1))
        k = x.unsqueeze(-3).expand_as(q)
        return F.scaled_dot_product_attention(q, k, v.transpose(-3, -2), scale=self.scale).sum(-3)


@SETTINGS
@given(b=st.integers(1, 3), h=st.integers(1, 4), n=st.integers(1, 9), d=st.integers(1, 8),
       dv=st.integers(1, 8),
       wider=st.booleans(), bias=st.booleans(), scale=st.sampled_from([None, 1.0, 0.37]),
       near_miss=st.sampled_from([None, None, "q_tensor", "dv_major"]), seed=st.integers(0, 2**16))
def test_rank_aware_attention_runs_without_transposes(b, h, n, d, dv, wider, bias, scale, near_miss, seed):
    """Queries stay in the (token, head) order their Linear writes and values are applied after the product:
    the only transpose left is the key's. Every case (near misses included) computes what SDPA computes."""
    torch.manual_seed(seed)
    dy = dv + 1 if wider else max(1, dv - 1)
    model = SplitLinearAttention(h, d, dv, dy, bias, scale, near_miss).eval()
    inputs = (torch.randn(b, n, d), torch.randn(b, n, dy))
    rewritten = rewrite_for_xnnpack(torch.export.export(model, inputs), inputs)
    ops = _ops(rewritten)
    moves = ops[aten.permute.default] + ops[aten.transpose.int]
    if near_miss is None:  # the key's transpose, plus v's own where v is wider than its input and stays
        assert (moves, ops[aten.linear.default]) == (1 + wider, 2), ops
    else:  # v split (dv, heads) keeps its two transposes; q from a tensor moves the probabilities too
        assert moves == {"dv_major": 3, "q_tensor": 4}[near_miss], ops
    with torch.no_grad():
        assert relative_error(model(*inputs), rewritten.module()(*inputs)) <= MODEL_RTOL[torch.float32]


class NearMiss(torch.nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, q, k, v):
        if self.kind == "mask":
            return F.scaled_dot_product_attention(q, k, v,
                                                  attn_mask=torch.ones(q.shape[-2], k.shape[-2]).tril())
        if self.kind == "causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q[0], k[0], v[0])  # 3-d: heads folded into the batch already


@pytest.mark.parametrize("kind", ["mask", "causal", "three_d"])
def test_attention_with_a_mask_or_causal_or_another_rank_stays_sdpa(kind):
    inputs = tuple(torch.randn(2, 3, 5, 4) for _ in range(3))
    program = torch.export.export(NearMiss(kind), inputs)
    rewritten = rewrite_for_xnnpack(program, inputs)
    assert _ops(rewritten)[aten.scaled_dot_product_attention.default] == 1


class Views(torch.nn.Module):
    def forward(self, x):
        a, b, c = x.unbind(1)
        return a.unsqueeze(0).squeeze(0) + b.select(-1, 2).unsqueeze(-1) + c[:, -1:].squeeze(1).unsqueeze(1)


def test_views_become_slices_and_reshapes_bit_for_bit():
    x = torch.randn(2, 3, 4, 5)
    program = torch.export.export(Views(), (x,))
    rewritten = rewrite_for_xnnpack(program, (x,))
    ops = _ops(rewritten)
    for op in (aten.unbind.int, aten.select.int, aten.squeeze.dims, aten.squeeze.dim, aten.unsqueeze.default):
        assert op not in ops, op
    assert torch.equal(Views()(x), rewritten.module()(x))


class Norms(torch.nn.Module):
    def __init__(self, affine: bool, eps: float):
        super().__init__()
        self.norm = torch.nn.LayerNorm(6, eps=eps, elementwise_affine=affine)
        if affine:
            with torch.no_grad():
                self.norm.weight.normal_()
                self.norm.bias.normal_()

    def forward(self, x):
        return self.norm(x), F.layer_norm(x.unsqueeze(0), (x.shape[-2], 6))  # the second: 2 axes, stays


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("eps", [1e-6, 1e-2])
def test_layer_norm_over_the_last_axis_is_written_with_linear_means(affine, eps):
    x = torch.randn(2, 5, 6) * 3 + 1
    model = Norms(affine, eps).eval()
    program = torch.export.export(model, (x,))
    rewritten = rewrite_for_xnnpack(program, (x,))
    ops = _ops(rewritten)
    assert ops[aten.layer_norm.default] == 1 and ops[aten.linear.default] == 2 and aten.mean.dim not in ops
    for expected, actual in zip(model(x), rewritten.module()(x)):
        assert relative_error(expected, actual) <= MODEL_RTOL[torch.float32]


def test_a_dynamic_batch_stays_dynamic_and_the_program_is_unchanged():
    model = Attention("expand_as", True, None)
    inputs = (torch.randn(2, 3, 7, 4), torch.randn(2, 7, 4), torch.randn(2, 3, 7, 5))
    batch = Dim("batch", min=1, max=64)
    program = torch.export.export(model, inputs, dynamic_shapes=({0: batch}, {0: batch}, {0: batch}))
    code = program.graph_module.code
    rewritten = rewrite_for_xnnpack(program, inputs)
    assert program.graph_module.code == code
    for b in (1, 5):
        xs = (torch.randn(b, 3, 7, 4), torch.randn(b, 7, 4), torch.randn(b, 3, 7, 5))
        assert relative_error(model(*xs), rewritten.module()(*xs)) <= MODEL_RTOL[torch.float32]


def test_a_program_with_nothing_to_rewrite_is_returned_as_it_is():
    program = torch.export.export(torch.nn.Linear(3, 4), (torch.randn(2, 3),))
    assert rewrite_for_xnnpack(program, (torch.randn(2, 3),)) is program


def test_xnnpack_takes_the_whole_fused_model():
    """After the rewrites a fused d3b4 lowers to one XNNPACK delegate; only the class token's expand to the
    batch runs outside it (without them: 17 delegates, with safe-softmax checks, expand copies, sums and
    LayerNorms between them)."""
    pytest.importorskip("executorch")
    import timm
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    import fxrep
    import fxrep.models  # noqa: F401

    torch.manual_seed(0)
    model = timm.create_model("fxrep_deit_tiny_d3b4", embed_dim=32, num_heads=2, num_classes=5, img_size=32,
                              patch_size=8)
    model.eval().set_join(1.0)
    x = torch.randn(1, 3, 32, 32)
    fused = fxrep.fuse(model, example_inputs=(x,))
    program = rewrite_for_xnnpack(torch.export.export(fused, (x,)), (x,))
    lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).exported_program()
    outside = collections.Counter(getattr(n.target, "__name__", str(n.target)) for n in lowered.graph.nodes
                                  if n.op == "call_function" and "getitem" not in str(n.target))
    delegates = outside.pop("executorch_call_delegate")
    assert delegates == 1 and outside == {"aten.expand_copy.default": 1}, (delegates, outside)


def test_a_rewrite_that_changes_the_output_is_an_internal_error(monkeypatch):
    import fxrep
    import fxrep.export.xnnpack

    def match(node, ctx):
        return fxrep.Match([node]) if node.target is aten.layer_norm.default else None

    def replace(match, ctx):  # drops the LayerNorm
        ctx.replace_node(match.nodes[0], match.nodes[0].args[0])

    broken = fxrep.FunctionPattern("drop_layer_norms", match, replace, phase="lower")
    monkeypatch.setattr(fxrep.export.xnnpack, "PATTERNS", (*fxrep.export.xnnpack.PATTERNS[:2], broken))
    x = torch.randn(2, 5, 6) * 3 + 1
    program = torch.export.export(Norms(False, 1e-6).eval(), (x,))
    with pytest.raises(fxrep.InternalError, match="xnnpack_rewrites=False"):
        rewrite_for_xnnpack(program, (x,))
