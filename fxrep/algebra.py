"""The identities of docs/reparam-math.md as pure float64 tensor functions (no graphs here).

Every function returns float64 tensors (but ``place_columns``, which only moves data); callers cast back to the
model dtype once, at the end.
Missing biases are passed as None and come back as None when the result has no bias either.
"""

from __future__ import annotations

import torch

f64 = torch.float64


def as64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(f64)


def fold_norm_affine(weight, bias, gamma, beta):
    """``W (g * n + beta) + b = (W diag g) n + (W beta + b)`` (math doc section 1)."""
    w = as64(weight)
    g = as64(gamma)
    be = as64(beta)
    new_w = w * g[None, :] if g is not None else w
    new_b = as64(bias)
    if be is not None:
        shift = w @ be
        new_b = shift if new_b is None else new_b + shift
    return new_w, new_b


def scale_rows(weight, bias, scale):
    """``c * (W x + b) = (diag c W) x + c b`` for a scalar or per-output-channel ``c`` (section 4)."""
    c = as64(scale)
    w = as64(weight)
    cw = c * w if c.dim() == 0 else c[:, None] * w
    return cw, None if bias is None else c * as64(bias)


def concat_rows(weights, biases):
    """Stack the first layers of parallel branches: ``[W1; ...; WB] x + [b1; ...; bB]`` (section 2)."""
    w = torch.cat([as64(t) for t in weights], 0)
    if all(b is None for b in biases):
        return w, None
    b = torch.cat([as64(b) if b is not None else torch.zeros(t.shape[0], dtype=f64)
                   for t, b in zip(weights, biases)])
    return w, b


def place_columns(weight, total: int, columns: torch.Tensor):
    """A (out, total) matrix that reads ``weight``'s input columns at the given positions, zeros elsewhere.

    Used to re-point a Linear that read one branch's hidden units at the same units inside a widened op;
    the zero columns contribute exactly nothing. Pure data movement, so unlike the rest of this module it
    keeps ``weight``'s dtype (no float64 round trip for the largest matrices of a widened model).
    """
    w = weight.detach()
    out = torch.zeros(w.shape[0], total, dtype=w.dtype)
    out[:, columns] = w
    return out


def head_rows(weight, bias, num_heads: int):
    """Split a head-major projection into per-head (weight, bias) blocks."""
    w = as64(weight).reshape(num_heads, -1, weight.shape[-1])
    b = None if bias is None else as64(bias).reshape(num_heads, -1)
    return w, b
