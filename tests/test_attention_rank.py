"""Attention on inputs of other ranks than (batch, tokens, dim).

fxrep's ``multi_head_attention`` treats every leading axis of its input as a batch axis. Window attention as
MaxViT writes it takes a (batch, rows, cols, dim) input and folds rows and columns into its tokens
(``view(B, -1, H, 3 * dh)``, output back to ``x.shape[:-1]``): that is no batched attention, and lifting it
built a graph that raised with a relative-position mask (and would have been silently wrong without one).
Such a block must be left alone, with a reason, whether fxrep sees its shapes (``example_inputs``) or not;
attention that is batched over every leading axis is still merged at any rank."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxrep
from fxrep.testing import assert_equivalent, assert_fused_equivalent


class WindowAttention(nn.Module):
    """MaxViT's ``AttentionCl`` (timm ``maxxvit.py``) in miniature: tokens are a window's rows and columns."""

    def __init__(self, dim: int, heads: int, window: int, rel_bias: bool):
        super().__init__()
        self.heads, self.dh = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        tokens = window * window
        self.bias = nn.Parameter(torch.randn(heads, tokens, tokens)) if rel_bias else None

    def forward(self, x):
        B, restore = x.shape[0], x.shape[:-1]
        q, k, v = self.qkv(x).view(B, -1, self.heads, 3 * self.dh).transpose(1, 2).chunk(3, dim=3)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)
        return self.proj(o.transpose(1, 2).reshape(restore + (-1,)))


class AnyRankAttention(nn.Module):
    """Attention batched over every leading axis: heads split with ``unflatten`` on the last axis."""

    def __init__(self, dim: int, heads: int, branches: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(branches))
        self.proj = nn.ModuleList(nn.Linear(dim, dim) for _ in range(branches))

    def forward(self, x):
        out = x
        for qkv, proj in zip(self.qkv, self.proj):
            q, k, v = qkv(x).unflatten(-1, (3, self.heads, -1)).movedim(-3, 0).transpose(-3, -2)
            o = F.scaled_dot_product_attention(q, k, v)
            out = out + proj(o.transpose(-3, -2).flatten(-2))
        return out


def _lift_skips(gm) -> list[str]:
    return [s.reason for s in gm.meta["fxrep_report"].skipped if s.pattern == "lift_attention"]


@settings(max_examples=12, deadline=None)
@given(heads=st.sampled_from([1, 2]), window=st.integers(2, 4), batch=st.integers(1, 3),
       rel_bias=st.booleans(), with_shapes=st.booleans())
def test_window_attention_over_folded_axes_is_left_alone_with_a_reason(heads, window, batch, rel_bias,
                                                                       with_shapes):
    torch.manual_seed(0)
    model = WindowAttention(8, heads, window, rel_bias).eval()
    x = torch.randn(batch, window, window, 8)
    fused = fxrep.fuse(model, example_inputs=(x,) if with_shapes else None)
    assert_equivalent(model, fused, (x,))
    assert_equivalent(model, fused, (torch.randn(batch + 1, window, window, 8),))
    assert fused.meta["fxrep_report"].after["sdpa"] == 1
    (reason,) = _lift_skips(fused)
    expected = "folds input axes together" if with_shapes else "pass example_inputs"
    assert expected in reason


@settings(max_examples=12, deadline=None)
@given(heads=st.sampled_from([1, 2]), branches=st.integers(2, 3),
       lead=st.sampled_from([(2,), (2, 3), (1, 2, 2)]),
       with_shapes=st.booleans())
def test_attention_batched_over_every_leading_axis_merges_at_any_rank(heads, branches, lead, with_shapes):
    torch.manual_seed(0)
    model = AnyRankAttention(8, heads, branches).eval()
    x = torch.randn(*lead, 5, 8)
    fused = assert_fused_equivalent(model, (x,)) if with_shapes else fxrep.fuse(model)
    assert_equivalent(model, fused, (x,))
    assert_equivalent(model, fused, (torch.randn(3, 2, 4, 8),))  # another rank, batch and token count
    assert fused.meta["fxrep_report"].after["sdpa"] == 1, _lift_skips(fused)
