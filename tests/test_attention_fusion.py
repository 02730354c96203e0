"""Property tests of attention recognition, widening and joining (docs/identities.md §2, §3, §8)."""

import pytest
import torch
from helpers import sdpa_calls
from hypothesis import given, settings

import fxrep
from fxrep.testing import (
    AttentionSpec,
    GeneratedAttentionBlock,
    assert_fused_equivalent,
    branched_attention_blocks,
    make_inputs,
)


def _heads(node):
    q = node.args[0]
    return q.meta["tensor_meta"].shape[1] if "tensor_meta" in q.meta else None


def _sdpa_heads(gm, inputs):
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(gm).propagate(*inputs)
    return [_heads(n) for n in sdpa_calls(gm)]


@settings(max_examples=40)
@given(branched_attention_blocks())
def test_fused_attention_blocks_are_equivalent_and_merged(case):
    spec = case.info["spec"]
    gm = assert_fused_equivalent(case.model, case.inputs)
    expect = spec.expect()
    heads = _sdpa_heads(gm, case.inputs)
    assert len(heads) == expect["sdpa"], gm.meta["fxrep_report"]
    if expect["heads"] is not None:
        assert heads == [expect["heads"]]


@given(branched_attention_blocks(near_miss=True))
def test_attention_near_misses_are_exact_and_reported(case):
    gm = assert_fused_equivalent(case.model, case.inputs)
    report = gm.meta["fxrep_report"]
    assert report.skipped, "a near miss must be reported as a skipped candidate"
    if case.info["spec"].near_miss == "read_outside":  # no Linear and sum takes its branch's columns apart
        assert any(s.pattern in ("widen_attention", "collapse_attention") for s in report.skipped), \
            [s.reason for s in report.skipped]


def test_joined_four_branch_attention_is_one_sdpa_of_single_branch_heads():
    spec = AttentionSpec(dim=16, heads=2, head_dim=8, branches=4, form="timm_explicit", lam=1.0)
    model = GeneratedAttentionBlock(spec)
    x = make_inputs(16, torch.float32)
    head_form = fxrep.default_registry().without("rank_aware_attention")
    gm = assert_fused_equivalent(model, x, patterns=head_form)
    assert _sdpa_heads(gm, x) == [2]
    widths = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "split"][0].args[1]
    assert widths == [2 * 4 * 8] * 3, "joined q/k (and v) heads concatenate the branches' head dims"


def test_widened_attention_is_one_sdpa_over_the_union_of_heads():
    spec = AttentionSpec(dim=16, heads=2, head_dim=8, branches=3, form="timm_sdpa", lam=None)
    x = make_inputs(16, torch.float32)
    gm = assert_fused_equivalent(GeneratedAttentionBlock(spec), x)
    assert _sdpa_heads(gm, x) == [6]


def test_timm_attention_with_attn_head_dim_different_from_dim_over_heads():
    from timm.layers import Attention

    torch.manual_seed(0)
    attn = Attention(12, num_heads=2, attn_head_dim=5, qkv_bias=True).eval()
    x = torch.randn(2, 7, 12)
    gm = assert_fused_equivalent(attn, (x,))
    assert len(sdpa_calls(gm)) == 1
    assert gm.meta["fxrep_report"].count("lift_attention") == 1


def test_masked_attention_is_skipped_with_its_reason():
    spec = AttentionSpec(branches=2, form="separate_sdpa", near_miss="mask")
    gm = fxrep.fuse(GeneratedAttentionBlock(spec))
    reasons = [s.reason for s in gm.meta["fxrep_report"].skipped]
    assert any("mask" in r for r in reasons), reasons


def test_partially_joined_attention_is_left_alone_and_says_why():
    spec = AttentionSpec(branches=2, form="timm_explicit", lam=0.5)
    x = make_inputs(spec.dim, torch.float32)
    gm = assert_fused_equivalent(GeneratedAttentionBlock(spec), x)
    reasons = [s.reason for s in gm.meta["fxrep_report"].skipped]
    assert any("0 < lam < 1" in r for r in reasons), reasons


def test_rank_aware_form_is_chosen_when_cheaper_and_reported():
    # joined: 4 branches x 8 head dims = q/k/v width 32 per head > model width 16: rank-aware is cheaper
    spec = AttentionSpec(dim=16, heads=2, head_dim=8, branches=4, form="separate_sdpa", lam=1.0,
                         dtype=torch.float64)
    x = make_inputs(16, torch.float64)
    gm = assert_fused_equivalent(GeneratedAttentionBlock(spec), x)
    report = gm.meta["fxrep_report"]
    assert report.count("rank_aware_attention") == 1
    assert _sdpa_heads(gm, x) == [2]
    # a single plain branch (width 8 per head < 16) keeps the per-head form, and the report says why
    spec = AttentionSpec(dim=16, heads=2, head_dim=8, branches=1, form="separate_sdpa", lam=None)
    gm = assert_fused_equivalent(GeneratedAttentionBlock(spec), make_inputs(16, torch.float32))
    reasons = [s.reason for s in gm.meta["fxrep_report"].skipped if s.pattern == "rank_aware_attention"]
    assert reasons and reasons[0].startswith("kept the per-head form")


def test_einsum_attention_is_recognized():
    spec = AttentionSpec(dim=8, heads=2, head_dim=4, branches=2, form="einsum", lam=1.0)
    x = make_inputs(8, torch.float32)
    gm = assert_fused_equivalent(GeneratedAttentionBlock(spec), x)
    assert gm.meta["fxrep_report"].count("lift_attention") == 2 and len(sdpa_calls(gm)) == 1


def test_an_attention_fxrep_cannot_read_is_reported_not_passed_over():
    """softmax(q k^T) masked_fill'ed and dropped out by hand, then multiplied with v: not a spelling fxrep
    knows, so the report says what reads the softmax."""
    class Unknown(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(8, 24)

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            p = (q @ k.transpose(-2, -1)).softmax(-1)
            return torch.where(p > 0.01, p, torch.zeros_like(p)) @ v

    gm = assert_fused_equivalent(Unknown().eval(), (torch.randn(2, 5, 8),))
    reasons = [s.reason for s in gm.meta["fxrep_report"].skipped if s.pattern == "lift_attention"]
    assert any("not recognized as attention" in r for r in reasons), reasons


@pytest.mark.parametrize("form", ["separate_sdpa", "softmax_module", "einsum"])
@pytest.mark.parametrize("lam", [None, 1.0])
def test_attention_branches_without_an_output_projection_merge(form, lam):
    """vit-pytorch's attention with one head as wide as the stream has ``to_out = nn.Identity()``: its
    branches are summed as they are. They widen into one attention over the union of heads (or, joined,
    collapse into one softmax), each branch reading its columns of the merged output."""
    spec = AttentionSpec(dim=8, heads=2, head_dim=4, branches=3, form=form, projection=False, lam=lam)
    x = make_inputs(8, torch.float32, 0)
    gm = assert_fused_equivalent(GeneratedAttentionBlock(spec), x)
    report = gm.meta["fxrep_report"]
    assert _sdpa_heads(gm, x) == [6 if lam is None else 2], report
    assert report.count("widen_attention" if lam is None else "collapse_attention") == 1
    assert not [s for s in report.skipped if s.pattern in ("widen_attention", "collapse_attention")], report
