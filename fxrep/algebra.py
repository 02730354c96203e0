"""The identities of docs/identities.md as pure float64 tensor functions (no graphs here).

Every function returns float64 tensors, except where the float64 round trip provably changes nothing: pure
data movement (``concat_rows``, ``place_columns``) keeps the weights' dtype, and ``fold_norm_affine``
multiplies in the model dtype when that is bitwise what float64-then-cast gives (see ``exact_product``).
Callers cast back to the model dtype once, at the end (a no-op for tensors already in it).
Missing biases are passed as None and come back as None when the result has no bias either.
"""

from __future__ import annotations

import math

import torch

f64 = torch.float64


def as64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(f64)


_EXACT_PRODUCT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def exact_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """``a * b`` in their common dtype when that equals ``(a.double() * b.double()).to(dtype)`` bit for bit,
    else None.

    The product of two p-bit significands has at most 2p bits, which float64 holds exactly for float32 (2 * 24
    <= 53) and the half types, so the float64 route rounds once, to the nearest value of the dtype. IEEE
    multiplication in the dtype is that same correctly rounded product (torch computes the half types in
    float32, where their products are exact too), overflow and subnormals included. Saves converting the
    largest weights to float64 and back when only one product is taken."""
    if a.dtype != b.dtype or a.dtype not in _EXACT_PRODUCT_DTYPES:
        return None
    return a * b


def fold_norm_affine(weight, bias, gamma, beta):
    """``W (g * n + beta) + b = (W diag g) n + (W beta + b)`` (docs/identities.md §1).

    The new weight comes back in ``weight``'s dtype when ``exact_product`` applies (one product per element,
    rounded once either way), else in float64; the bias is float64 whenever something was added to it, and
    None when there is none (a zero ``beta`` shifts nothing). Returns new tensors."""
    w = weight.detach()
    if gamma is None:
        new_w = w.clone()
    else:
        new_w = exact_product(w, gamma.detach()[None, :])
        if new_w is None:
            new_w = as64(w) * as64(gamma)[None, :]
    new_b = None if bias is None else bias.detach().to(f64, copy=True)
    if beta is not None and bool(beta.detach().any()):
        shift = _matvec64(w, as64(beta))
        new_b = shift if new_b is None else new_b + shift
    elif beta is not None and not math.isfinite(float(w.sum())):
        # inf * 0 is NaN: keep what the float64 product gives (a finite sum means finite elements; a sum
        # that overflows only costs this slower path)
        shift = as64(w) @ as64(beta)
        new_b = shift if new_b is None else new_b + shift
    return new_w, new_b


def _matvec64(w: torch.Tensor, v: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """``w @ v`` in float64, converting ``rows`` rows of ``w`` at a time (no float64 copy of a large
    ``w``)."""
    if w.dtype == f64 or w.shape[0] <= rows:
        return as64(w) @ v
    return torch.cat([as64(chunk) @ v for chunk in w.split(rows)])


def scale_term(c: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``c * t`` for a float64 scalar or per-row ``c`` (a vector ``t`` is scaled elementwise). In ``t``'s
    dtype when ``t`` is a model-dtype weight and ``c`` is exactly representable there: one correctly rounded
    product, the bits of the float64 route (``exact_product``), at half the memory traffic of a LayerScale
    folded into a large weight; else float64."""
    rows = c if c.dim() == 0 or t.dim() <= 1 else c[:, None]
    if t.dtype != f64:
        c_model = rows.to(t.dtype)
        if torch.equal(c_model.to(f64), rows):
            product = exact_product(t, c_model)
            if product is not None:
                return product
    return rows * as64(t)  # (converting first is faster than a mixed-dtype multiply)


def scale_rows(weight, bias, scale):
    """``c * (W x + b) = (diag c W) x + c b`` for a scalar or per-output-channel ``c`` (section 4)."""
    c = as64(scale)
    return scale_term(c, weight.detach()), None if bias is None else c * as64(bias)


def concat_rows(weights, biases):
    """Stack the first layers of parallel branches: ``[W1; ...; WB] x + [b1; ...; bB]`` (section 2).

    Pure data movement: the result keeps the inputs' dtype when they share one (float64 otherwise)."""
    dtypes = {t.dtype for t in weights} | {b.dtype for b in biases if b is not None}
    dtype = dtypes.pop() if len(dtypes) == 1 else f64
    w = torch.cat([t.detach().to(dtype) for t in weights], 0)
    if all(b is None for b in biases):
        return w, None
    b = torch.cat([b.detach().to(dtype) if b is not None else torch.zeros(t.shape[0], dtype=dtype)
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
    starts = _run_starts(columns)
    if len(starts) > 64:
        out.index_copy_(1, columns, w)
        return out
    bounds = starts + [len(columns)]
    for a, b in zip(bounds, bounds[1:]):  # runs of consecutive columns (heads): slice copies are fastest
        first = int(columns[a])
        out[:, first:first + b - a] = w[:, a:b]
    return out


def _run_starts(columns: torch.Tensor) -> list[int]:
    """Positions where ``columns`` does not continue the previous column + 1."""
    if columns.numel() == 0:
        return []
    breaks = torch.nonzero(columns[1:] != columns[:-1] + 1).flatten() + 1
    return [0] + breaks.tolist()


def head_rows(weight, bias, num_heads: int):
    """Split a head-major projection into per-head (weight, bias) blocks."""
    w = as64(weight).reshape(num_heads, -1, weight.shape[-1])
    b = None if bias is None else as64(bias).reshape(num_heads, -1)
    return w, b
