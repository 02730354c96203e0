"""The pure identities of docs/reparam-math.md, each checked against the unfused computation in float64."""

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from fxrep import algebra

f64 = torch.float64
dims = st.integers(1, 12)


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=f64)


@given(d=dims, o=dims, bias=st.booleans(), seed=st.integers(0, 10_000))
def test_fold_norm_affine(d, o, bias, seed):
    w, b, g, beta, x = _rand(o, d, seed=seed), _rand(o, seed=seed + 1), _rand(d, seed=seed + 2), \
        _rand(d, seed=seed + 3), _rand(5, d, seed=seed + 4)
    b = b if bias else None
    want = F.linear(F.layer_norm(x, (d,), g, beta), w, b)
    nw, nb = algebra.fold_norm_affine(w, b, g, beta)
    got = F.linear(F.layer_norm(x, (d,)), nw, nb)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@given(d=dims, o=dims, per_channel=st.booleans(), seed=st.integers(0, 10_000))
def test_scale_rows(d, o, per_channel, seed):
    w, b, x = _rand(o, d, seed=seed), _rand(o, seed=seed + 1), _rand(3, d, seed=seed + 2)
    c = _rand(o, seed=seed + 3) if per_channel else torch.tensor(0.37, dtype=f64)
    nw, nb = algebra.scale_rows(w, b, c)
    torch.testing.assert_close(F.linear(x, nw, nb), c * F.linear(x, w, b), rtol=1e-12, atol=1e-12)


@given(d=dims, widths=st.lists(dims, min_size=1, max_size=5), seed=st.integers(0, 10_000))
def test_concat_and_place_columns_widen_a_sum_of_mlps(d, widths, seed):
    x = _rand(4, d, seed=seed)
    w1 = [_rand(h, d, seed=seed + i) for i, h in enumerate(widths)]
    b1 = [_rand(h, seed=seed + 10 + i) if i % 2 == 0 else None for i, h in enumerate(widths)]
    w2 = [_rand(d, h, seed=seed + 20 + i) for i, h in enumerate(widths)]
    want = sum(F.linear(F.gelu(F.linear(x, a, b)), c) for a, b, c in zip(w1, b1, w2))
    w, b = algebra.concat_rows(w1, b1)
    h = F.gelu(F.linear(x, w, b))
    total, offset, got = sum(widths), 0, 0
    for c, width in zip(w2, widths):
        got = got + F.linear(h, algebra.place_columns(c, total, torch.arange(offset, offset + width)))
        offset += width
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@given(heads=st.integers(1, 4), dh=st.integers(1, 6), d=dims, seed=st.integers(0, 10_000))
def test_head_rows_round_trip(heads, dh, d, seed):
    w, b = _rand(heads * dh, d, seed=seed), _rand(heads * dh, seed=seed + 1)
    hw, hb = algebra.head_rows(w, b, heads)
    assert hw.shape == (heads, dh, d) and hb.shape == (heads, dh)
    assert torch.equal(hw.flatten(0, 1), w) and torch.equal(hb.flatten(0, 1), b)
