"""Build a branched model from a deep timm VisionTransformer (for users who compress an existing model)."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer

from .branched_vit import BranchedBlock
from .registry import _create


@torch.no_grad()
def branch_from(deep: VisionTransformer, depth: int) -> torch.nn.Module:
    """A branched ViT of ``depth`` blocks whose block ``b`` has ``len(deep.blocks) // depth`` branches, branch
    ``i`` initialized from deep block ``b * branches + i``. Embeddings, final norm and head are copied. The
    result starts at ``lam = 0`` (independent branches); train it with a JoinSchedule towards ``lam = 1``."""
    n = len(deep.blocks)
    if depth < 1 or n % depth:
        raise ValueError(f"depth {depth} must divide the deep model's {n} blocks")
    branches = n // depth
    blk = deep.blocks[0]
    attn = blk.attn
    if not hasattr(attn, "qkv") or getattr(attn, "q_norm", None).__class__.__name__ != "Identity":
        raise ValueError("branch_from needs timm ViT blocks with a fused qkv Linear and no q/k norm")
    embed_dim = deep.embed_dim
    model = _create("fxrep_deit_tiny_d12b1", branches=branches, depth=depth, embed_dim=embed_dim,
                    num_heads=attn.num_heads, head_dim=attn.head_dim,
                    mlp_ratio=blk.mlp.fc1.out_features / embed_dim, num_classes=deep.num_classes,
                    img_size=deep.patch_embed.img_size, patch_size=deep.patch_embed.patch_size,
                    in_chans=deep.patch_embed.proj.in_channels, qkv_bias=attn.qkv.bias is not None,
                    init_values=1.0 if not isinstance(blk.ls1, torch.nn.Identity) else None,
                    class_token=deep.cls_token is not None, global_pool=deep.global_pool)
    model.to(dtype=next(deep.parameters()).dtype)
    own = model.state_dict()
    for key, value in deep.state_dict().items():
        if not key.startswith("blocks.") and key in own and own[key].shape == value.shape:
            own[key].copy_(value)
    for b, block in enumerate(model.blocks):
        assert isinstance(block, BranchedBlock)
        for i in range(branches):
            src = deep.blocks[b * branches + i]
            pairs = [(block.norm1[i], src.norm1), (block.norm2[i], src.norm2),
                     (block.attn.qkv[i], src.attn.qkv), (block.attn.proj[i], src.attn.proj),
                     (block.mlp.fc1[i], src.mlp.fc1), (block.mlp.fc2[i], src.mlp.fc2),
                     (block.ls1[i], src.ls1), (block.ls2[i], src.ls2)]
            for dst_mod, src_mod in pairs:
                for (_, d), (_, s) in zip(dst_mod.named_parameters(), src_mod.named_parameters()):
                    d.copy_(s)
    model.load_state_dict(own)
    return model
