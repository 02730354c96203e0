"""``nn.MultiheadAttention`` lifts to fxrep's attention op: torchvision's ViT and parallel MHA branches merge,
exactly; what cannot be lifted is a skip with its reason."""

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import fxrep
from fxrep.testing import assert_fused_equivalent, compare_outputs


class MhaBranches(nn.Module):
    """``x + sum_i mha_i(ln_i(x))`` (the torchvision EncoderBlock attention half, B times in parallel)."""

    def __init__(self, branches, dim, heads, bias, batch_first, need_weights):
        super().__init__()
        self.need_weights = need_weights
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(branches))
        self.attns = nn.ModuleList(nn.MultiheadAttention(dim, heads, bias=bias, batch_first=batch_first)
                                   for _ in range(branches))

    def forward(self, x):
        outs = []
        for norm, attn in zip(self.norms, self.attns):
            y = norm(x)
            o, _ = attn(y, y, y, need_weights=self.need_weights)
            outs.append(o)
        return x + sum(outs)


@given(branches=st.integers(1, 3), heads=st.integers(1, 3), head_dim=st.integers(1, 4), bias=st.booleans(),
       batch_first=st.booleans(), need_weights=st.booleans(), unbatched=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 1000))
def test_multihead_attention_branches_lift_and_merge(branches, heads, head_dim, bias, batch_first,
                                                     need_weights,
                                                     unbatched, dtype, seed):
    torch.manual_seed(seed)
    dim = heads * head_dim
    model = MhaBranches(branches, dim, heads, bias, batch_first, need_weights).to(dtype).eval()
    x = torch.randn(5, dim, dtype=dtype) if unbatched else torch.randn(2, 5, dim, dtype=dtype)
    gm = assert_fused_equivalent(model, (x,))
    report = gm.meta["fxrep_report"]
    assert report.count("lift_multihead_attention") == branches
    assert report.after["sdpa"] == 1 and not any(n.op == "call_module" for n in gm.graph.nodes)


@settings(max_examples=10)
@given(branches=st.integers(1, 3), heads=st.integers(1, 3), head_dim=st.integers(1, 4), bias=st.booleans(),
       batch_first=st.booleans(), need_weights=st.booleans(), core_aten=st.booleans(),
       seed=st.integers(0, 1000))
def test_exported_multihead_attention_branches_lift_and_merge(branches, heads, head_dim, bias, batch_first,
                                                              need_weights, core_aten, seed):
    """``torch.export`` inlines ``nn.MultiheadAttention``: tokens first around the in-projection (a transpose
    for ``batch_first``), the output projection on flattened (tokens*batch) rows, each branch's output
    transposed back before the sum, and, with ``need_weights``, the attention through ``bmm`` with heads
    folded into the batch. The branches lift as tokens-first attention and merge into one, exactly, in the
    ATen and the core ATen graph, and at another batch size."""
    torch.manual_seed(seed)
    dim = heads * head_dim
    model = MhaBranches(branches, dim, heads, bias, batch_first, need_weights).eval()
    x = torch.randn(2, 5, dim) if batch_first else torch.randn(5, 2, dim)
    # fxrep reasons about a dynamic batch on dim 0 only: the tokens-first model is exported static
    dynamic = ({0: torch.export.Dim("batch")},) if batch_first else None
    program = torch.export.export(model, (x,), dynamic_shapes=dynamic)
    if core_aten:
        program = program.run_decompositions()
    fused = fxrep.fuse(program, example_inputs=(x,))
    report = fused.graph_module.meta["fxrep_report"]
    assert report.count("lift_attention") == branches, report
    assert report.after["sdpa"] == 1 and report.after["softmax"] == 0, report
    other = torch.randn(3, 5, dim) if batch_first else torch.randn(5, 2, dim)
    assert_fused_equivalent(model, (other,), fused=fused.module())


def test_torchvision_vision_transformer_lifts_every_attention():
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                              mlp_dim=32,
                              num_classes=5).eval()
    gm = assert_fused_equivalent(model, (torch.randn(2, 3, 32, 32),))
    report = gm.meta["fxrep_report"]
    assert report.after["sdpa"] == 2 and report.after["params"] <= report.before["params"]


class Mha(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=how == "bias_kv",
                                          add_zero_attn=how == "zero_attn", kdim=4 if how == "kdim" else None,
                                          vdim=4 if how == "kdim" else None)
        self.register_buffer("mem", torch.randn(1, 3, 4 if how == "kdim" else 8))

    def forward(self, x):
        if self.how == "weights":
            o, w = self.attn(x, x, x)
            return o, w
        if self.how == "cross":
            return self.attn(x, self.mem.expand(2, -1, -1), self.mem.expand(2, -1, -1))[0]
        if self.how == "kdim":
            return self.attn(x, self.mem.expand(2, -1, -1), self.mem.expand(2, -1, -1))[0]
        return self.attn(x, x, x)[0]


@pytest.mark.parametrize("how, reason", [
    ("weights", "attention weights"), ("cross", "cross-attention"), ("bias_kv", "add_bias_kv"),
    ("zero_attn", "add_zero_attn"), ("kdim", "cross-attention"),
])
def test_what_cannot_be_lifted_is_a_skip_with_the_reason(how, reason):
    gm = assert_fused_equivalent(Mha(how).eval(), (torch.randn(2, 5, 8),))
    report = gm.meta["fxrep_report"]
    assert report.count("lift_multihead_attention") == 0
    assert any(reason in s.reason for s in report.skipped), [s.reason for s in report.skipped]


class MaskedMhaBranches(nn.Module):
    """Parallel ``nn.MultiheadAttention`` branches that all read the model's mask inputs: ``names`` says which
    of ``attn_mask`` and ``key_padding_mask`` the inputs after ``x`` are."""

    def __init__(self, branches, dim, heads, batch_first, need_weights, names):
        super().__init__()
        self.need_weights, self.names = need_weights, names
        self.attns = nn.ModuleList(nn.MultiheadAttention(dim, heads, batch_first=batch_first)
                                   for _ in range(branches))

    def forward(self, x, first=None, second=None):
        masks = dict(zip(self.names, (first, second)))
        return x + sum(a(x, x, x, **masks, need_weights=self.need_weights)[0] for a in self.attns)


def _masks(kind_attn, kind_pad, batch, heads, n, g):
    """Random masks of nn.MultiheadAttention's forms in which key 0 is never masked (no row is empty)."""
    lead = () if batch is None else (batch * heads,)
    attn = None
    if kind_attn != "none":
        shape = ((heads,) if batch is None else lead) + (n, n) if kind_attn.endswith("3d") else (n, n)
        if kind_attn.startswith("bool"):
            attn = torch.rand(shape, generator=g) < 0.3
            attn[..., 0] = False
        else:
            attn = torch.randn(shape, generator=g)
    pad = None
    if kind_pad != "none":
        shape = (n,) if batch is None else (batch, n)
        pad = (torch.rand(shape, generator=g) < 0.3) if kind_pad == "bool" else torch.randn(shape,
                                                                                            generator=g)
        if kind_pad == "bool":
            pad[..., 0] = False
    return attn, pad


@given(branches=st.integers(1, 3), heads=st.integers(1, 3), head_dim=st.integers(1, 4),
       batch_first=st.booleans(),
       need_weights=st.booleans(), batch=st.sampled_from([None, 2]),
       kind_attn=st.sampled_from(["none", "bool_2d", "float_2d", "bool_3d", "float_3d"]),
       kind_pad=st.sampled_from(["none", "bool", "float"]), seed=st.integers(0, 1000))
def test_masked_multihead_attention_branches_lift_and_merge(branches, heads, head_dim, batch_first,
                                                            need_weights,
                                                            batch, kind_attn, kind_pad, seed):
    """Boolean masks mean "do not attend" here (the opposite of SDPA's); fxrep merges both masks as torch
    does, at run time, so the fused model is exact for other mask values and another batch size too."""
    bool_and_float = kind_attn.startswith("bool") and kind_pad == "float"
    float_and_bool = kind_attn.startswith("float") and kind_pad == "bool"
    if bool_and_float or float_and_bool:
        kind_pad = "none"  # mixing a boolean and a float mask is deprecated in torch
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    dim, n = heads * head_dim, 5
    names = [name
             for name, kind in (("attn_mask", kind_attn), ("key_padding_mask", kind_pad)) if kind != "none"]
    model = MaskedMhaBranches(branches, dim, heads, batch_first, need_weights, names).eval()

    def inputs(b):
        x = torch.randn(n, dim, generator=g) if batch is None else \
            torch.randn((b, n, dim) if batch_first else (n, b, dim), generator=g)
        return (x, *(m for m in _masks(kind_attn, kind_pad, None if batch is None else b, heads, n, g)
                     if m is not None))
    gm = assert_fused_equivalent(model, inputs(batch))
    report = gm.meta["fxrep_report"]
    assert report.count("lift_multihead_attention") == branches, report
    assert report.after["sdpa"] == 1, report
    if batch is not None:
        other = inputs(3)
        compare_outputs(model(*other), gm(*other))  # NaNs (fully masked rows) in the same places
