"""``nn.MultiheadAttention`` lifts to fxrep's attention op: torchvision's ViT and parallel MHA branches merge,
exactly; what cannot be lifted is a skip with its reason."""

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

from fxrep.testing import assert_fused_equivalent


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
def test_multihead_attention_branches_lift_and_merge(branches, heads, head_dim, bias, batch_first, need_weights,
                                                     unbatched, dtype, seed):
    torch.manual_seed(seed)
    dim = heads * head_dim
    model = MhaBranches(branches, dim, heads, bias, batch_first, need_weights).to(dtype).eval()
    x = torch.randn(5, dim, dtype=dtype) if unbatched else torch.randn(2, 5, dim, dtype=dtype)
    gm = assert_fused_equivalent(model, (x,))
    report = gm.meta["fxrep_report"]
    assert report.count("lift_multihead_attention") == branches
    assert report.after["sdpa"] == 1 and not any(n.op == "call_module" for n in gm.graph.nodes)


def test_torchvision_vision_transformer_lifts_every_attention():
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
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
        if self.how == "mask":
            return self.attn(x, x, x, attn_mask=torch.zeros(5, 5))[0]
        return self.attn(x, x, x)[0]


@pytest.mark.parametrize("how, reason", [
    ("weights", "attention weights"), ("cross", "cross-attention"), ("bias_kv", "add_bias_kv"),
    ("zero_attn", "add_zero_attn"), ("mask", "attn_mask"), ("kdim", "cross-attention"),
])
def test_what_cannot_be_lifted_is_a_skip_with_the_reason(how, reason):
    gm = assert_fused_equivalent(Mha(how).eval(), (torch.randn(2, 5, 8),))
    report = gm.meta["fxrep_report"]
    assert report.count("lift_multihead_attention") == 0
    assert any(reason in s.reason for s in report.skipped), [s.reason for s in report.skipped]
