"""The conformance suite: ViTs and branched blocks written by others (timm, torchvision), fused in both flows
(the module, and a graph the user traced with plain ``torch.fx.symbolic_trace``), exact at the example batch
and at another one, with one attention and one activation per block where the branches conform."""

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import Attention, Mlp
from torchvision.models.vision_transformer import EncoderBlock, VisionTransformer

import fxrep
from fxrep.equivalence import assert_equivalent
from fxrep.snapshot import ModelSnapshot


class TimmBranches(nn.Module):
    """B parallel copies of timm's Attention and Mlp on one residual stream."""

    def __init__(self, branches: int, dim: int = 16, heads: int = 2):
        super().__init__()
        self.norm1 = nn.ModuleList(nn.LayerNorm(dim) for _ in range(branches))
        self.attn = nn.ModuleList(Attention(dim, heads, qkv_bias=True) for _ in range(branches))
        self.norm2 = nn.ModuleList(nn.LayerNorm(dim) for _ in range(branches))
        self.mlp = nn.ModuleList(Mlp(dim, 2 * dim) for _ in range(branches))

    def forward(self, x):
        x = x + sum(a(n(x)) for n, a in zip(self.norm1, self.attn))
        return x + sum(m(n(x)) for n, m in zip(self.norm2, self.mlp))


class TorchvisionBranches(nn.Module):
    """B parallel copies of torchvision's EncoderBlock halves (nn.MultiheadAttention, MLPBlock)."""

    def __init__(self, branches: int, dim: int = 16, heads: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(EncoderBlock(heads, dim, 2 * dim, 0.0, 0.0) for _ in range(branches))

    def forward(self, x):
        outs = []
        for blk in self.blocks:
            y = blk.ln_1(x)
            outs.append(blk.self_attention(y, y, y, need_weights=False)[0])
        x = x + sum(outs)
        return x + sum(blk.mlp(blk.ln_2(x)) for blk in self.blocks)


IMAGE = dict(img_size=32, patch_size=8, num_classes=5)
CASES = {
    # name: (builder, input of batch b, blocks)
    "timm_deit_tiny": (lambda: timm.create_model("deit_tiny_patch16_224", depth=2, **IMAGE), "image", 2),
    "timm_vit_small_18x2": (lambda: timm.create_model("vit_small_patch16_18x2_224", depth=2, embed_dim=48,
                                                      num_heads=3, **IMAGE), "image", 2),
    "timm_deit3_small": (lambda: timm.create_model("deit3_small_patch16_224", depth=2, embed_dim=48, num_heads=3,
                                                   **IMAGE), "image", 2),
    "torchvision_vit": (lambda: VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                  hidden_dim=16, mlp_dim=32, num_classes=5), "image", 2),
    "timm_blocks_x2": (lambda: TimmBranches(2), "tokens", 1),
    "timm_blocks_x4": (lambda: TimmBranches(4), "tokens", 1),
    "torchvision_blocks_x3": (lambda: TorchvisionBranches(3), "tokens", 1),
}


def _input(kind: str, batch: int):
    g = torch.Generator().manual_seed(batch)
    return (torch.randn(batch, 3, 32, 32, generator=g),) if kind == "image" else \
        (torch.randn(batch, 7, 16, generator=g),)


@pytest.mark.parametrize("flow", ["module", "traced"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_models_written_by_others_fuse_exactly_in_both_flows(name, flow):
    build, kind, blocks = CASES[name]
    torch.manual_seed(0)
    model = build().eval()
    snapshot = ModelSnapshot(model)
    subject = model if flow == "module" else torch.fx.symbolic_trace(model)
    fused = fxrep.fuse(subject, example_inputs=_input(kind, 2))
    after = fused.meta["fxrep_report"].after
    assert (after["sdpa"], after["activation"]) == (blocks, blocks), fused.meta["fxrep_report"]
    for batch in (2, 3):  # example inputs inform decisions, not the graph
        assert_equivalent(model, fused, _input(kind, batch))
    assert snapshot.diff(model) == ""
