"""The reader of fxrep's own attention op (``ops.multi_head_attention``), which lives between the lift and
lower phases."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from ..ops import multi_head_attention
from .readers import constant_tensor

_PROJECTIONS = ("q", "k", "v")


@dataclass
class AttentionView:
    """The arguments of an fxrep ``multi_head_attention`` node: its input, the q/k/v weights and biases
    (head-major rows) and the head count."""

    node: fx.Node
    input: fx.Node
    q_weight: torch.Tensor
    q_bias: torch.Tensor | None
    k_weight: torch.Tensor
    k_bias: torch.Tensor | None
    v_weight: torch.Tensor
    v_bias: torch.Tensor | None
    num_heads: int
    attn_mask: object = None     # SDPA's: a node (run-time mask, possibly None) or None
    is_causal: object = False    # SDPA's: a bool or a node
    mask_repeats: int = 1        # how often a per-head mask is tiled along the head axis
    tokens_first: bool = False   # input and output are (N, ..., d) (nn.MultiheadAttention, batch_first=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.q_weight.dtype

    def weight(self, p: str) -> torch.Tensor:
        return getattr(self, f"{p}_weight")

    def bias(self, p: str) -> torch.Tensor | None:
        return getattr(self, f"{p}_bias")

    def params(self) -> dict:
        """``{'q_weight': ..., 'q_bias': ..., ...}``, as ``emit_attention`` takes them."""
        return {f"{p}_{kind}": getattr(self, f"{p}_{kind}") for p in _PROJECTIONS
                for kind in ("weight", "bias")}

    def head_widths(self) -> tuple[int, int, int]:
        """(heads, q/k width per head, v width per head)."""
        H = self.num_heads
        return H, self.q_weight.shape[0] // H, self.v_weight.shape[0] // H

    def masking(self) -> dict:
        """The arguments besides the weights (mask, causality, layout), as ``emit_attention`` takes them."""
        return {"attn_mask": self.attn_mask, "is_causal": self.is_causal, "mask_repeats": self.mask_repeats,
                "tokens_first": self.tokens_first}


def attention_view(node) -> AttentionView | None:
    """An fxrep ``multi_head_attention`` node with constant q/k/v weights as an AttentionView, else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is multi_head_attention):
        return None
    x, *params = node.args[:7]
    tensors = [constant_tensor(v) if v is not None else None for v in params]
    if tensors[0] is None or tensors[2] is None or tensors[4] is None:
        return None
    kw = node.kwargs
    return AttentionView(node, x, *tensors, num_heads=kw["num_heads"], attn_mask=kw.get("attn_mask"),
                         is_causal=kw.get("is_causal", False), mask_repeats=kw.get("mask_repeats", 1),
                         tokens_first=kw.get("tokens_first", False))
