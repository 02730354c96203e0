"""The conformance suite: ViTs and branched blocks written by others (timm, torchvision, Hugging Face,
einops-based vit-pytorch, open_clip), fused in every flow they can be captured in (the module, a graph the
user traced with plain ``torch.fx.symbolic_trace``, and a ``torch.export`` program with a dynamic batch, some
also in core ATen after ``run_decompositions()``), exact at the example batch and at another one, with one
attention and one activation per block where the branches conform. Hugging Face ``transformers`` 5.x models
and einops code cannot be fx-traced: in the module flow ``fxrep.fuse`` captures them with torch.export itself.
(Hugging Face sdpa models pass an all-True boolean mask, which core ATen adds to the logits as
``where(mask, 0, -inf)``.)"""

import pytest
import timm
import torch
import torch.nn as nn
from open_clip.transformer import VisionTransformer as OpenClipVisionTransformer
from timm.layers import Attention, Mlp
from torchvision.models.vision_transformer import EncoderBlock, VisionTransformer
from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    Dinov2Config,
    Dinov2Model,
    ViTConfig,
    ViTForImageClassification,
)
from transformers.models.vit.modeling_vit import ViTAttention, ViTMLP
from vit_pytorch import ViT
from vit_pytorch.parallel_vit import ViT as ParallelViT

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


class HuggingFaceBranches(nn.Module):
    """B parallel copies of Hugging Face's ViTAttention and ViTMLP (with their own LayerNorms) on one residual
    stream, as a branched ViT written with transformers' layers would be."""

    def __init__(self, branches: int, attn_implementation: str, dim: int = 16, heads: int = 2):
        super().__init__()
        config = ViTConfig(hidden_size=dim, num_attention_heads=heads, intermediate_size=2 * dim)
        config._attn_implementation = attn_implementation
        self.norm1 = nn.ModuleList(nn.LayerNorm(dim) for _ in range(branches))
        self.attn = nn.ModuleList(ViTAttention(config) for _ in range(branches))
        self.norm2 = nn.ModuleList(nn.LayerNorm(dim) for _ in range(branches))
        self.mlp = nn.ModuleList(ViTMLP(config) for _ in range(branches))

    def forward(self, x):
        x = x + sum(a(n(x))[0] for n, a in zip(self.norm1, self.attn))
        return x + sum(m(n(x)) for n, m in zip(self.norm2, self.mlp))


def _hugging_face(model_class, config_class, attn_implementation: str):
    def build():
        config = config_class(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64,
                              image_size=32, patch_size=8, num_labels=5)
        config._attn_implementation = attn_implementation
        return model_class(config)
    return build


IMAGE = dict(img_size=32, patch_size=8, num_classes=5)
EINOPS = dict(image_size=32, patch_size=8, num_classes=5, dim=32, depth=2, heads=2, dim_head=16, mlp_dim=64)
ALL_FLOWS, EXPORTED = ("module", "traced", "exported"), ("exported",)
CORE = ("core_aten",)  # exported, then ExportedProgram.run_decompositions()
CASES = {
    # name: (builder, input of batch b, blocks, flows)
    "timm_deit_tiny": (lambda: timm.create_model("deit_tiny_patch16_224", depth=2, **IMAGE), "image", 2,
                       ALL_FLOWS + CORE),
    "timm_vit_small_18x2": (lambda: timm.create_model("vit_small_patch16_18x2_224", depth=2, embed_dim=48,
                                                      num_heads=3, **IMAGE), "image", 2, ALL_FLOWS + CORE),
    "timm_deit3_small": (lambda: timm.create_model("deit3_small_patch16_224", depth=2, embed_dim=48,
                                                   num_heads=3,
                                                   **IMAGE), "image", 2, ALL_FLOWS),
    "torchvision_vit": (lambda: VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                  hidden_dim=16, mlp_dim=32, num_classes=5), "image", 2,
                                                  ALL_FLOWS),
    "timm_blocks_x2": (lambda: TimmBranches(2), "tokens", 1, ALL_FLOWS),
    "timm_blocks_x4": (lambda: TimmBranches(4), "tokens", 1, ALL_FLOWS),
    # exported, nn.MultiheadAttention is inlined tokens-first around the in-projection, with the
    # out-projection on flattened (tokens * batch) rows: the branches still merge (docs/identities.md §9)
    "torchvision_blocks_x3": (lambda: TorchvisionBranches(3), "tokens", 1, ALL_FLOWS + CORE),
    # einops-based collections (vit-pytorch) and open_clip: fx cannot trace einops, fxrep.fuse captures
    # those with torch.export
    "einops_vit": (lambda: ViT(**EINOPS), "image", 2, ("module", "exported")),
    **{f"einops_parallel_vit_x{b}": (lambda b=b: ParallelViT(num_parallel_branches=b, **EINOPS), "image", 2,
                                     ("module", "exported")) for b in (2, 3)},
    # one head as wide as the stream: vit-pytorch has no output projection (to_out = nn.Identity()), the
    # branches' attention outputs are summed as they are
    "einops_parallel_vit_no_projection": (lambda: ParallelViT(num_parallel_branches=2, **{
        **EINOPS, "heads": 1, "dim_head": EINOPS["dim"]}), "image", 2, ("module", "exported")),
    "open_clip_vit": (lambda: OpenClipVisionTransformer(image_size=32, patch_size=8, width=32, layers=2,
                                                        heads=2, mlp_ratio=2.0, output_dim=16), "image", 2,
                      ALL_FLOWS),
    **{f"hf_{name}_{impl}": (_hugging_face(*classes, impl), "image", 2, ("module",) + EXPORTED + CORE)
       for name, classes in (("vit", (ViTForImageClassification, ViTConfig)),
                             ("deit", (DeiTForImageClassification, DeiTConfig)),
                             ("dinov2", (Dinov2Model, Dinov2Config)))
       for impl in ("eager", "sdpa")},
    **{f"hf_blocks_x{b}_{impl}": (lambda b=b, impl=impl: HuggingFaceBranches(b, impl), "tokens", 1,
                                  EXPORTED + CORE)
       for b in (2, 3) for impl in ("eager", "sdpa")},
}
FLOW_CASES = [(name, flow) for name in sorted(CASES) for flow in CASES[name][3]]


def _input(kind: str, batch: int):
    g = torch.Generator().manual_seed(batch)
    return (torch.randn(batch, 3, 32, 32, generator=g),) if kind == "image" else \
        (torch.randn(batch, 7, 16, generator=g),)


def _capture(model, flow: str, example: tuple):
    if flow == "traced":
        return torch.fx.symbolic_trace(model)
    if flow in ("exported", "core_aten"):
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(model, example, dynamic_shapes=({0: batch},))
        return program.run_decompositions() if flow == "core_aten" else program
    return model


@pytest.mark.parametrize("name,flow", FLOW_CASES, ids=[f"{n}-{f}" for n, f in FLOW_CASES])
def test_models_written_by_others_fuse_exactly_in_every_flow(name, flow):
    build, kind, blocks, _ = CASES[name]
    torch.manual_seed(0)
    model = build().eval()
    subject = _capture(model, flow, _input(kind, 2))
    snapshot = ModelSnapshot(model)  # after capturing: torch.export rebinds attributes (timm's _model_args)
    fused = fxrep.fuse(subject, example_inputs=_input(kind, 2))
    if flow in ("exported", "core_aten"):
        assert isinstance(fused, torch.export.ExportedProgram)
        report, fused = fused.graph_module.meta["fxrep_report"], fused.module()
    else:
        report = fused.meta["fxrep_report"]
    assert (report.after["sdpa"], report.after["activation"]) == (blocks, blocks), report
    for batch in (2, 3):  # example inputs inform decisions, not the graph
        assert_equivalent(model, fused, _input(kind, batch))
    assert snapshot.diff(model) == ""
