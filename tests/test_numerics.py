"""The error bounds the suite's tolerances come from (fxrep.numerics): each holds for every summation order a
kernel may use, on any CPU, and is tight enough that a wrong result does not pass it."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fxrep.numerics import MODEL_RTOL, gamma, layer_norm_error_bound, matmul_error_bound, ulp, unit_roundoff

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _sequential_matmul(a, b, dtype, reverse=False):
    """``a @ b`` summed one term at a time in ``dtype``, forwards or backwards: the worst orders for a
    pairwise or blocked kernel, and certainly other orders than torch's."""
    a, b = a.to(dtype), b.to(dtype)
    acc = torch.zeros(a.shape[0], b.shape[1], dtype=dtype)
    order = range(a.shape[1] - 1, -1, -1) if reverse else range(a.shape[1])
    for i in order:
        acc = acc + a[:, i:i + 1] * b[i:i + 1, :]
    return acc


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 8), k=st.integers(1, 300), n=st.integers(1, 8),
       scale=st.sampled_from([1e-3, 1.0, 1e3]),
       offset=st.sampled_from([0.0, 10.0]), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2 ** 16))
def test_the_matmul_bound_holds_in_every_summation_order(m, k, n, scale, offset, dtype, seed):
    """(Without overflow or underflow, which the bound, like Higham's model, leaves out: float16 spans
    6e-5 to 65504, so its values here stay near 1.)"""
    assume(dtype != torch.float16 or scale == 1.0)
    # beyond that the worst-case bound says nothing (bfloat16, k > 127)
    assume((k + 1) * unit_roundoff(dtype) < 0.5)
    g = torch.Generator().manual_seed(seed)
    a = ((torch.randn(m, k, generator=g) + offset) * scale).to(dtype)
    b = (torch.randn(k, n, generator=g) - offset).to(dtype)
    exact = a.double() @ b.double()
    bound = matmul_error_bound(a, b)
    for got in (a @ b if dtype == torch.float32 else (a.float() @ b.float()).to(dtype),
                _sequential_matmul(a, b, dtype), _sequential_matmul(a, b, dtype, reverse=True)):
        assert ((got.double() - exact).abs() <= bound).all()


def test_the_matmul_bound_catches_a_wrong_product():
    a, b = torch.randn(16, 192), torch.randn(192, 8)
    exact = a.double() @ b.double()
    bound = matmul_error_bound(a, b)
    assert (bound < 1e-3 * exact.abs().max()).all()  # far below the values themselves: not vacuous
    wrong = exact.clone()
    wrong[3, 2] += 1e-3 * exact.abs().max()
    assert not ((wrong - exact).abs() <= bound).all()


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), d=st.integers(2, 300), offset=st.sampled_from([0.0, 3.0, 100.0]),
       spread=st.sampled_from([1e-2, 1.0, 10.0]), eps=st.sampled_from([1e-6, 1e-5, 1e-2]),
       strided=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_the_layer_norm_bound_holds_for_contiguous_and_strided_inputs(rows, d, offset, spread, eps, strided,
                                                                      seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(d, rows, generator=g).T * spread + offset if strided else \
        torch.randn(rows, d, generator=g) * spread + offset
    w, b = torch.randn(d, generator=g), torch.randn(d, generator=g)
    exact = F.layer_norm(x.double(), (d,), w.double(), b.double(), eps)
    got = F.layer_norm(x, (d,), w, b, eps)
    assert ((got.double() - exact).abs() <= layer_norm_error_bound(x, w, b, eps)).all()


def test_gamma_and_ulp():
    u = unit_roundoff(torch.float32)
    assert u == 2.0 ** -24 and gamma(1, torch.float32) == pytest.approx(u / (1 - u))
    assert ulp(torch.tensor([1.0, 2.0, 0.5])).tolist() == [2.0 ** -23, 2.0 ** -22, 2.0 ** -24]
    with pytest.raises(ValueError):
        gamma(2 ** 24, torch.float32)
    with pytest.raises(TypeError):
        unit_roundoff(torch.int32)


def test_model_tolerances_are_stated_in_units_of_roundoff():
    """docs/numerics.md states each model tolerance as a multiple of its dtype's unit roundoff."""
    multiples = {dtype: MODEL_RTOL[dtype] / unit_roundoff(dtype) for dtype in MODEL_RTOL}
    assert 100 < multiples[torch.float32] < 200 and 10 < multiples[torch.float16] < 30
    assert 1 < multiples[torch.bfloat16] < 10 and multiples[torch.float64] < 1e6
