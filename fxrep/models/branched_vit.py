"""Branched ViT blocks with progressive joining (docs/identities.md §3), in timm style.

Each block has ``branches`` parallel attention branches and ``branches`` parallel MLP branches, each with its
own LayerNorm and LayerScale, all reading the block input. The join coefficient ``lam`` (a buffer, set for
the whole model by ``set_join``) mixes the branches at the inputs of their nonlinearities:

    softmax input of branch i:  (1 - lam) * S_i + lam * mean_j S_j      (S_i = scale * q_i k_i^T)
    GELU input of branch i:     (1 - lam) * z_i + lam * mean_j z_j      (z_i = fc1_i(norm2_i(x)))

At ``lam == 1`` every branch sees the same nonlinearity input, and ``fxrep.fuse`` collapses the block into
one attention of the single-branch head count and one MLP of the single-branch width.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import DropPath, LayerScale
from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask

# timm's mask helpers branch on their arguments: calls from this module are fx leaves too, as in timm's
torch.fx.wrap("maybe_add_mask")
torch.fx.wrap("resolve_self_attn_mask")


class BranchedAttention(nn.Module):
    """``branches`` timm-style attentions (fused qkv Linear, explicit softmax) joined at the softmax input."""

    def __init__(self, dim: int, num_heads: int = 3, head_dim: int | None = None, branches: int = 2,
                 qkv_bias: bool = True, proj_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0,
                 device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        self.scale = self.head_dim ** -0.5
        inner = num_heads * self.head_dim
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * inner, bias=qkv_bias, **dd) for _ in range(branches))
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.ModuleList(nn.Linear(inner, dim, bias=proj_bias, **dd) for _ in range(branches))
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, xs: list[torch.Tensor], lam: torch.Tensor, mask=None) -> list[torch.Tensor]:
        """``mask``: an additive mask (or None), added once to every branch's joined logits."""
        B, N, _ = xs[0].shape
        logits, values = [], []
        for qkv, x in zip(self.qkv, xs):
            q, k, v = qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            logits.append((q * self.scale) @ k.transpose(-2, -1))
            values.append(v)
        mean = sum(logits) / len(logits)
        outs = []
        for s, v, proj in zip(logits, values, self.proj):
            attn = maybe_add_mask((1 - lam) * s + lam * mean, mask).softmax(dim=-1)
            o = (self.attn_drop(attn) @ v).transpose(1, 2).reshape(B, N, -1)
            outs.append(self.proj_drop(proj(o)))
        return outs


class BranchedMlp(nn.Module):
    """``branches`` MLPs joined at the activation input."""

    def __init__(self, dim: int, hidden: int, branches: int = 2, act_layer=nn.GELU, bias: bool = True,
                 drop: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.fc1 = nn.ModuleList(nn.Linear(dim, hidden, bias=bias, **dd) for _ in range(branches))
        self.act = act_layer()
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.ModuleList(nn.Linear(hidden, dim, bias=bias, **dd) for _ in range(branches))

    def forward(self, xs: list[torch.Tensor], lam: torch.Tensor) -> list[torch.Tensor]:
        z = [fc1(x) for fc1, x in zip(self.fc1, xs)]
        mean = sum(z) / len(z)
        return [self.drop(fc2(self.drop(self.act((1 - lam) * zi + lam * mean))))
                for zi, fc2 in zip(z, self.fc2)]


class BranchedBlock(nn.Module):
    """A timm ``block_fn``: accepts timm's Block arguments plus ``branches`` and ``head_dim``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_bias: bool = True, init_values: float | None = None, proj_drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, norm_layer=nn.LayerNorm, act_layer=nn.GELU,
                 branches: int = 2, head_dim: int | None = None, device=None, dtype=None, **unused):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.branches = branches
        self.norm1 = nn.ModuleList(norm_layer(dim, **dd) for _ in range(branches))
        self.attn = BranchedAttention(dim, num_heads, head_dim, branches, qkv_bias, proj_bias, attn_drop,
                                      proj_drop, **dd)
        self.ls1 = nn.ModuleList(LayerScale(dim, init_values, **dd) if init_values else nn.Identity()
                                 for _ in range(branches))
        self.norm2 = nn.ModuleList(norm_layer(dim, **dd) for _ in range(branches))
        self.mlp = BranchedMlp(dim, int(dim * mlp_ratio), branches, act_layer, drop=proj_drop, **dd)
        self.ls2 = nn.ModuleList(LayerScale(dim, init_values, **dd) if init_values else nn.Identity()
                                 for _ in range(branches))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.register_buffer("join_lam", torch.zeros((), dtype=dtype or torch.get_default_dtype()))

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        # timm's mask semantics (SDPA's: a boolean mask attends where True, a float one is added); resolved
        # from the block input, so the normalized branch inputs are read by their Linears only
        mask = resolve_self_attn_mask(x.shape[1], x, attn_mask, is_causal)
        outs = self.attn([norm(x) for norm in self.norm1], self.join_lam, mask)
        x = x + self.drop_path(sum(ls(o) for ls, o in zip(self.ls1, outs)))
        outs = self.mlp([norm(x) for norm in self.norm2], self.join_lam)
        return x + self.drop_path(sum(ls(o) for ls, o in zip(self.ls2, outs)))


def set_join(model: nn.Module, lam: float) -> None:
    """Set the join coefficient of every BranchedBlock in ``model`` (0: independent branches, 1: joined)."""
    if not 0.0 <= float(lam) <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    for m in model.modules():
        if isinstance(m, BranchedBlock):
            m.join_lam.fill_(float(lam))


def get_join(model: nn.Module) -> float | None:
    for m in model.modules():
        if isinstance(m, BranchedBlock):
            return float(m.join_lam)
    return None
