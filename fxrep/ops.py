"""The one op fxrep adds to graphs while it works: multi-head attention with the scale folded into q.

It lives only between the lift and lower phases: the lower phase expands every call into
``F.linear -> split -> scaled_dot_product_attention`` so fused graphs contain plain torch ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def multi_head_attention(x, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, *, num_heads: int,
                         attn_mask=None, is_causal=False, mask_repeats: int = 1, tokens_first: bool = False):
    """``concat_h softmax(q_h k_h^T + M_h) v_h`` for ``x`` of shape (..., N, d); output (..., N, H * dv).

    q/k/v are ``F.linear(x, W, b)`` split head-major into ``num_heads`` heads; q and k may have a different
    head width than v. No scale is applied: it is folded into ``q_weight``/``q_bias``. ``attn_mask`` and
    ``is_causal`` are SDPA's (a run-time value, possibly None); a mask with a head axis is tiled
    ``mask_repeats`` times along it (widened branches each see their heads of it, docs/identities.md §6).
    ``tokens_first``: ``x`` and the output are (N, ..., d), as ``nn.MultiheadAttention(batch_first=False)``
    takes them (a 2-d input is the same either way).
    """
    if tokens_first:
        x = x.transpose(0, -2)
    q = F.linear(x, q_weight, q_bias).unflatten(-1, (num_heads, -1)).transpose(-3, -2)
    k = F.linear(x, k_weight, k_bias).unflatten(-1, (num_heads, -1)).transpose(-3, -2)
    v = F.linear(x, v_weight, v_bias).unflatten(-1, (num_heads, -1)).transpose(-3, -2)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=repeat_mask_heads(attn_mask, mask_repeats),
                                       is_causal=is_causal, scale=1.0)
    o = o.transpose(-3, -2).flatten(-2)
    return o.transpose(0, -2) if tokens_first else o


def repeat_mask_heads(mask, repeats: int):
    """``mask`` tiled ``repeats`` times along its head axis (dim -3) when it has one of size > 1; else as is
    (None, (N, N), (1, N, N) and (b, 1, N, N) masks broadcast over any head count)."""
    if repeats == 1 or not isinstance(mask, torch.Tensor) or mask.dim() < 3 or mask.shape[-3] == 1:
        return mask
    return mask.repeat(*([1] * (mask.dim() - 3)), repeats, 1, 1)


def multihead_attention_mask(attn_mask, key_padding_mask, num_heads: int, query):
    """``nn.MultiheadAttention``'s two masks as the one mask SDPA takes, merged as
    ``F.multi_head_attention_forward`` merges them: a boolean mask (True: do not attend, the opposite of
    SDPA's) becomes a float mask with -inf there, ``attn_mask`` (L, S) or (batch * heads, L, S) gets a head
    axis, and ``key_padding_mask`` (batch, S) is added over every head and query. ``query`` is the (batched or
    unbatched, batch-first) input, for its dtype and rank."""
    padding = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                target_type=query.dtype)
    mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                             target_type=query.dtype, check_other=False)
    batched = query.dim() == 3
    if mask is not None and batched and mask.dim() == 3 and mask.shape[0] != 1:
        mask = mask.view(-1, num_heads, *mask.shape[-2:])  # (batch * heads, L, S) -> (batch, heads, L, S)
    if padding is not None:
        padding = padding.view(padding.shape[0], 1, 1, -1) if batched else padding.view(1, 1, -1)
        mask = padding if mask is None else mask + padding
    return mask


def reference_attention(x: torch.Tensor, params: dict, num_heads: int, project=F.linear,
                        causal: bool = False) -> torch.Tensor:
    """The same computation (without a mask, or with the causal one) written with an explicit softmax, used to
    verify lifts in float64. ``project(x, w, b)`` computes the q/k/v projections (a caller may memoize
    them)."""
    def split(w, b):
        return project(x, w, b).unflatten(-1, (num_heads, -1)).transpose(-3, -2)

    q = split(params["q_weight"], params.get("q_bias"))
    k = split(params["k_weight"], params.get("k_bias"))
    v = split(params["v_weight"], params.get("v_bias"))
    s = q @ k.transpose(-2, -1)
    if causal:
        s = s + torch.full(s.shape[-2:], float("-inf"), dtype=s.dtype).triu(1)
    p = torch.softmax(s, dim=-1)
    return (p @ v).transpose(-3, -2).flatten(-2)
