"""Rounding error bounds: the tolerances fxrep's checks and tests use, each derived from an op's error bound.

Two evaluations of the same value on different machines (or with different summation orders) may differ in
their last bits, so fxrep never compares floats for bitwise equality across machines. What it compares
instead, and why each tolerance is what it is, is in docs/numerics.md. In short:

- one rounding of an exact (or float64) value to ``dtype`` is off by at most half a unit in the last place;
  two machines that round float64 results differing in their last float64 bits agree within one ``ulp``;
- an inner product of length ``k`` computed in a dtype with unit roundoff ``u`` is off by at most
  ``gamma(k) * sum |a_i b_i|`` (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., §3.1),
  in any summation order: that is ``matmul_error_bound``;
- whole models are compared at ``MODEL_RTOL`` relative to ``max |y|`` (docs/numerics.md says how it was set
  and what was measured against it on three CPU kernel sets).
"""

from __future__ import annotations

import torch

UNIT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11,
                 torch.bfloat16: 2.0 ** -8}

# fused vs original model outputs, max |delta| / max |y|, by dtype (docs/numerics.md, "Whole models")
MODEL_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u``: the largest relative error of one rounding to ``dtype`` (half its machine epsilon)."""
    try:
        return UNIT_ROUNDOFF[dtype]
    except KeyError:
        raise TypeError(f"no unit roundoff for {dtype}: a floating-point dtype is needed") from None


def gamma(n: int, dtype: torch.dtype) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: the relative error bound of a sum of ``n`` products."""
    nu = n * unit_roundoff(dtype)
    if nu >= 1:
        raise ValueError(f"gamma_{n} is unbounded in {dtype} (n u >= 1)")
    return nu / (1 - nu)


def ulp(t: torch.Tensor) -> torch.Tensor:
    """The spacing of ``t``'s dtype at each element's magnitude (a unit in the last place), as float64."""
    a = t.detach().abs()
    return (torch.nextafter(a, torch.full_like(a, float("inf"))) - a).double()


def matmul_error_bound(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None,
                       dtype: torch.dtype | None = None) -> torch.Tensor:
    """Elementwise bound on ``|fl(a @ b + bias) - (a @ b + bias)|`` computed in ``dtype`` (default: ``a``'s):
    ``gamma_k (|a| @ |b| + |bias|)`` with ``k`` the number of terms of each sum (the inner dimension, plus one
    for a bias). Valid for any summation order, so two evaluations (two kernels, two machines) differ by at
    most twice this. Like Higham's model it assumes no overflow or underflow (no infinities, no subnormal
    results)."""
    dtype = dtype or a.dtype
    magnitude = a.detach().double().abs() @ b.detach().double().abs()
    if bias is not None:
        magnitude = magnitude + bias.detach().double().abs()
    return gamma(a.shape[-1] + (bias is not None), dtype) * magnitude


def layer_norm_error_bound(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                           eps: float,
                           dtype: torch.dtype | None = None) -> torch.Tensor:
    """Elementwise first-order bound on the rounding error of ``F.layer_norm(x, (d,), weight, bias, eps)``
    over the last axis, computed in ``dtype`` in any summation order.

    With ``d`` features: the mean is off by at most ``gamma_d mean|x|``, the variance (a mean of squares of
    the centred values) by ``gamma_(d+2) var + 2 |d mean| mean|x - mean|``, so ``1/sqrt(var + eps)`` by half
    its relative error plus one rounding each for the square root and the division; the output adds
    ``|x - mean|`` times that, the mean's error, and a rounding for each of the centring, scaling, weight and
    bias."""
    dtype = dtype or x.dtype
    u, d = unit_roundoff(dtype), x.shape[-1]
    x64 = x.detach().double()
    mean = x64.mean(-1, keepdim=True)
    centred = x64 - mean
    var = centred.pow(2).mean(-1, keepdim=True)
    d_mean = gamma(d, dtype) * x64.abs().mean(-1, keepdim=True)
    d_var = gamma(d + 2, dtype) * var + 2 * d_mean * centred.abs().mean(-1, keepdim=True)
    rstd = (var + eps).rsqrt()
    d_rstd = rstd * (0.5 * d_var / (var + eps) + 2 * u)
    g = weight.detach().double().abs() if weight is not None else 1.0
    b = bias.detach().double().abs() if bias is not None else 0.0
    y = centred.abs() * rstd
    return g * (centred.abs() * d_rstd + d_mean * rstd + 2 * u * y) + 2 * u * (g * y + b)
