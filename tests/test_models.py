"""Branched ViTs registered with timm: create, join, fuse end to end; timm's own ViT; branch_from."""

import pytest
import timm
import torch
from helpers import activations, hidden_widths, sdpa_calls

import fxrep
import fxrep.models  # noqa: F401  (registers the timm models)
from fxrep.models import branch_from, set_join
from fxrep.testing import assert_fused_equivalent

SMALL = dict(num_classes=10, img_size=32, patch_size=8, in_chans=1, init_values=0.5, drop_path_rate=0.1)


def _random(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.dim() == 1
                                                               and p.numel() > 1 else 0.0) * 0)
    return model.eval()


@pytest.mark.parametrize("name,depth,branches",
                         [("fxrep_deit_tiny_d6b2", 6, 2), ("fxrep_deit_tiny_d4b3", 4, 3),
                                                 ("fxrep_deit_tiny_d3b4", 3, 4)])
@pytest.mark.parametrize("lam", [1.0, 0.0])
def test_registered_models_fuse_to_one_path_per_block(name, depth, branches, lam):
    model = _random(timm.create_model(name, **SMALL))
    model.set_join(lam)
    x = (torch.randn(2, 1, 32, 32),)
    gm = assert_fused_equivalent(model, x)
    assert len(sdpa_calls(gm)) == depth
    assert len(activations(gm)) == depth
    report = gm.meta["fxrep_report"]
    widths = hidden_widths(gm, x)
    if lam == 1.0:
        assert widths == [768] * depth, "joined MLPs keep the single-branch width"
        assert report.after["flops"] < report.before["flops"]
    else:
        assert widths == [768 * branches] * depth, "independent MLP branches are widened"


def test_deit_tiny_d3b4_full_size_collapses_to_three_layers():
    model = _random(timm.create_model("fxrep_deit_tiny_d3b4", num_classes=10))
    model.set_join(1.0)
    assert model.join == 1.0
    x = (torch.randn(1, 3, 224, 224),)
    gm = assert_fused_equivalent(model, x)
    assert (len(sdpa_calls(gm)), len(activations(gm))) == (3, 3)


def test_timm_vision_transformer_fuses_exactly():
    model = _random(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32,
                                      patch_size=8, init_values=1e-1))
    gm = assert_fused_equivalent(model, (torch.randn(2, 3, 32, 32),))
    assert len(sdpa_calls(gm)) == 12


def test_pretrained_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("fxrep_deit_tiny_d3b4", pretrained=True)


def test_branch_from_copies_consecutive_layers_into_branches():
    deep = _random(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32,
                                     patch_size=8, depth=6, init_values=1e-1))
    model = branch_from(deep, depth=3).eval()
    assert len(model.blocks) == 3 and model.blocks[0].branches == 2
    assert torch.equal(model.blocks[1].attn.qkv[1].weight, deep.blocks[3].attn.qkv.weight)
    assert torch.equal(model.blocks[2].mlp.fc2[0].bias, deep.blocks[4].mlp.fc2.bias)
    assert torch.equal(model.pos_embed, deep.pos_embed) and torch.equal(model.head.weight, deep.head.weight)
    set_join(model, 1.0)
    gm = assert_fused_equivalent(model, (torch.randn(2, 3, 32, 32),))
    assert len(sdpa_calls(gm)) == 3
    with pytest.raises(ValueError, match="divide"):
        branch_from(deep, depth=4)


@pytest.mark.parametrize("name, branches", [("fxrep_deit_tiny_d6b2", 2), ("fxrep_deit_tiny_d3b4", 4)])
def test_branched_models_start_as_the_mean_of_their_branches(name, branches):
    small = dict(num_classes=3, img_size=16, patch_size=8, depth=1)
    model = timm.create_model(name, **small)
    for ls in list(model.blocks[0].ls1) + list(model.blocks[0].ls2):
        assert torch.equal(ls.gamma.detach(), torch.full((192,), 1.0 / branches))
    plain = timm.create_model(name, init_values=0, **small)
    assert all(isinstance(ls, torch.nn.Identity) for ls in plain.blocks[0].ls1)
    assert all(isinstance(b.ls1[0], torch.nn.Identity)
               for b in timm.create_model("fxrep_deit_tiny_d12b1", **small).blocks)
