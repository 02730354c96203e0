"""Attention masks (docs/identities.md §6) and user-traced parity: a model traced by the user with plain
``torch.fx.symbolic_trace`` keeps ``attn_mask``/``is_causal`` as inputs; fxrep merges its branches as it does
for the module, and the fused model takes the same masks as the original."""

import pytest
import timm
import torch

import fxrep
import fxrep.models  # noqa: F401
from fxrep.testing import (
    AttentionSpec,
    GeneratedAttentionBlock,
    assert_fused_equivalent,
    compare_outputs,
    make_inputs,
)

N_TOKENS = 17  # 32 px, patch 8, plus the class token


def _models():
    return {
        "fxrep_d3b4": lambda: timm.create_model("fxrep_deit_tiny_d3b4", embed_dim=32, num_heads=2,
                                                num_classes=5,
                                                  img_size=32, patch_size=8),
        "timm_deit_tiny": lambda: timm.create_model("deit_tiny_patch16_224", depth=2, img_size=32,
                                                    patch_size=8,
                                                    num_classes=5),
        "timm_vit_small_18x2": lambda: timm.create_model("vit_small_patch16_18x2_224", depth=2, img_size=32,
                                                         patch_size=8, num_classes=5, embed_dim=48,
                                                         num_heads=3),
    }


def _heads(model) -> int:
    attn = model.blocks[0].attn if hasattr(model.blocks[0], "attn") else model.blocks[0].attns[0].attn
    return attn.num_heads


def _masks(heads: int, batch: int):
    g = torch.Generator().manual_seed(0)
    return {"none": None, "float": torch.randn(N_TOKENS, N_TOKENS, generator=g),
            "bool": (torch.rand(N_TOKENS, N_TOKENS, generator=g) > 0.3) | torch.eye(N_TOKENS,
                                                                                    dtype=torch.bool),
            "per_head": torch.randn(batch, heads, N_TOKENS, N_TOKENS, generator=g)}


@pytest.fixture(scope="module", params=sorted(_models()))
def fused_pair(request):
    torch.manual_seed(0)
    model = _models()[request.param]().eval()
    if hasattr(model, "set_join"):
        model.set_join(1.0)
    x = torch.randn(2, 3, 32, 32)
    traced = torch.fx.symbolic_trace(model)
    assert [n.name for n in traced.graph.nodes if n.op == "placeholder"] == ["x", "attn_mask", "is_causal"]
    return model, fxrep.fuse(model, example_inputs=(x,)), fxrep.fuse(traced, example_inputs=(x,))


def test_user_traced_graphs_merge_like_the_module(fused_pair):
    _, from_module, from_traced = fused_pair
    a, b = from_module.meta["fxrep_report"].after, from_traced.meta["fxrep_report"].after
    assert {k: a[k] for k in ("sdpa", "linear", "activation", "layer_norm")} == \
        {k: b[k] for k in ("sdpa", "linear", "activation", "layer_norm")}
    assert a["sdpa"] == a["activation"]  # one attention and one MLP per block


@pytest.mark.parametrize("mask", ["none", "float", "bool", "per_head"])
@pytest.mark.parametrize("batch", [2, 3])
def test_the_fused_user_traced_model_takes_every_mask(fused_pair, mask, batch):
    model, _, fused = fused_pair
    x = torch.randn(batch, 3, 32, 32)
    m = _masks(_heads(model), batch)[mask]
    with torch.no_grad():
        want, got = model(x, attn_mask=m), fused(x, m)
    compare_outputs(want, got)


def test_the_fused_user_traced_model_is_causal_when_asked(fused_pair):
    model, _, fused = fused_pair
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want, got = model(x, is_causal=True), fused(x, None, True)
    compare_outputs(want, got)


def test_a_module_fused_without_a_mask_refuses_one_with_the_fix(fused_pair):
    model, from_module, _ = fused_pair
    with pytest.raises(fxrep.InputError, match="attn_mask"):
        from_module(torch.randn(2, 3, 32, 32), torch.zeros(N_TOKENS, N_TOKENS))


@pytest.mark.parametrize("lam", [None, 1.0])
@pytest.mark.parametrize("form", ["timm_sdpa", "timm_explicit", "separate_sdpa", "einsum"])
def test_a_shared_per_head_mask_merges(form, lam):
    spec = AttentionSpec(dim=8, heads=2, head_dim=4, branches=3, form=form, lam=lam, mask=True)
    gm = assert_fused_equivalent(GeneratedAttentionBlock(spec), make_inputs(8, torch.float32))
    assert gm.meta["fxrep_report"].after["sdpa"] == 1


@pytest.mark.parametrize("near_miss, reason", [("mask", "mask"), ("causal", "is_causal")])
@pytest.mark.parametrize("form", ["timm_sdpa", "separate_sdpa", "separate_softmax_scale_before"])
def test_different_masks_or_causality_per_branch_are_near_misses(near_miss, reason, form):
    spec = AttentionSpec(dim=8, heads=2, head_dim=4, branches=3, form=form, near_miss=near_miss)
    gm = assert_fused_equivalent(GeneratedAttentionBlock(spec), make_inputs(8, torch.float32))
    report = gm.meta["fxrep_report"]
    assert report.after["sdpa"] >= 2
    assert any(reason in s.reason for s in report.skipped), [s.reason for s in report.skipped]
