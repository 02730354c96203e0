"""Merging the heads of attention ops that read one input (docs/identities.md §2 and §3): the weights of the
merged op, and where each branch's output columns land in it. Only concatenation and zero padding, done in
the weights' dtype: no float64 round trip is needed."""

from __future__ import annotations

import torch


def _head_blocks(att, p: str, width: int | None = None):
    """(heads, rows, d) weight and (heads, rows) bias of projection ``p`` ('q', 'k' or 'v'), each head's rows
    zero-padded to ``width``; the bias is None when the op has none."""
    H = att.num_heads
    w = att.weight(p).detach()
    w = w.reshape(H, -1, w.shape[-1])
    b = att.bias(p)
    b = b.detach().reshape(H, -1) if b is not None else None
    pad = 0 if width is None else width - w.shape[1]
    if pad:
        w = torch.nn.functional.pad(w, (0, 0, 0, pad))
        b = torch.nn.functional.pad(b, (0, pad)) if b is not None else None
    return w, b


def _concat_heads(blocks, dim: int):
    """Concatenate (weight, bias) head blocks along ``dim`` (0: more heads, 1: wider heads), then flatten to
    head-major rows. A missing bias is zeros when another block has one."""
    w = torch.cat([w for w, _ in blocks], dim)
    if all(b is None for _, b in blocks):
        return w.flatten(0, 1), None
    b = torch.cat([b if b is not None else w_.new_zeros(w_.shape[:2]) for w_, b in blocks], dim)
    return w.flatten(0, 1), b.flatten(0, 1)


def collapse_heads(atts):
    """The merged op of attentions with joined logits (docs/identities.md §3): they share q/k, and each head's
    values are the concatenation of theirs. Returns (params, heads, where branch i's output columns land,
    output width, mask arguments)."""
    H = atts[0].num_heads
    dv = [a.head_widths()[2] for a in atts]
    offsets = [sum(dv[:i]) for i in range(len(atts))]
    columns = [torch.cat([torch.arange(h * sum(dv) + off, h * sum(dv) + off + dvi) for h in range(H)])
               for off, dvi in zip(offsets, dv)]
    v_weight, v_bias = _concat_heads([_head_blocks(a, "v") for a in atts], 1)
    params = {key: getattr(atts[0], key) for key in ("q_weight", "q_bias", "k_weight", "k_bias")}
    params.update(v_weight=v_weight, v_bias=v_bias)
    return params, H, columns, H * sum(dv), atts[0].masking()


def widen_heads(atts):
    """The merged op of parallel attentions (docs/identities.md §2): the heads of all side by side, q/k and v
    head widths zero-padded to the largest. Returns what ``collapse_heads`` returns."""
    dqk = max(a.head_widths()[1] for a in atts)
    dv = max(a.head_widths()[2] for a in atts)
    params, columns, heads = {}, [], 0
    for p, width in (("q", dqk), ("k", dqk), ("v", dv)):
        blocks = [_head_blocks(a, p, width) for a in atts]
        params[f"{p}_weight"], params[f"{p}_bias"] = _concat_heads(blocks, 0)
    for a in atts:
        H, _, dvi = a.head_widths()
        columns.append(torch.cat([torch.arange((heads + h) * dv, (heads + h) * dv + dvi) for h in range(H)]))
        heads += H
    masking = dict(atts[0].masking(), mask_repeats=sum(a.mask_repeats for a in atts))  # heads side by side
    return params, heads, columns, heads * dv, masking


def same_logits(a, b) -> bool:
    if a.num_heads != b.num_heads:
        return False
    for key in ("q_weight", "q_bias", "k_weight", "k_bias"):
        x, y = getattr(a, key), getattr(b, key)
        if x is y:  # joined branches read the very same q/k constants after lift_attention and CSE
            continue
        if (x is None) != (y is None) or (x is not None and (x.shape != y.shape or not torch.equal(x, y))):
            return False
    return True
