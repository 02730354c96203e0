"""The pure identities of docs/identities.md, each checked against the unfused computation in float64."""

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from fxrep import algebra
from fxrep.numerics import gamma, layer_norm_error_bound, matmul_error_bound, unit_roundoff

f64 = torch.float64
dims = st.integers(1, 12)
U = unit_roundoff(f64)
GELU_SLOPE, GELU_ROUNDINGS = 1.13, 8  # max |gelu'(z)| (1.129 at z = 1.41); roundings of its erf form


def assert_within(got, want, bound):
    """|got - want| <= bound elementwise: each side's rounding error, bounded from its ops
    (docs/numerics.md)."""
    excess = (got - want).abs() - bound
    assert bool((excess <= 0).all()), f"off by {excess.max().item():.3g} beyond the rounding bound"


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=f64)


@given(d=dims, o=dims, bias=st.booleans(), seed=st.integers(0, 10_000))
def test_fold_norm_affine(d, o, bias, seed):
    w, b, g, beta, x = _rand(o, d, seed=seed), _rand(o, seed=seed + 1), _rand(d, seed=seed + 2), \
        _rand(d, seed=seed + 3), _rand(5, d, seed=seed + 4)
    b = b if bias else None
    normed, plain = F.layer_norm(x, (d,), g, beta), F.layer_norm(x, (d,))
    want = F.linear(normed, w, b)
    nw, nb = algebra.fold_norm_affine(w, b, g, beta)
    got = F.linear(plain, nw, nb)
    want_error = layer_norm_error_bound(x, g, beta, 1e-5) @ w.abs().T + matmul_error_bound(normed, w.T, b)
    got_error = layer_norm_error_bound(x, None, None, 1e-5) @ nw.abs().T + matmul_error_bound(plain, nw.T, nb)
    fold_error = U * plain.abs() @ nw.abs().T + matmul_error_bound(beta[None], w.T, b)  # the fold's roundings
    bound = want_error + got_error + fold_error
    assert_within(got, want, bound)


@given(d=dims, o=dims, dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       beta_zero=st.booleans(), seed=st.integers(0, 10_000))
def test_fold_norm_affine_in_the_model_dtype_is_the_float64_result(d, o, dtype, beta_zero, seed):
    """The same-dtype product is bitwise the float64 product cast back; the bias shift stays float64."""
    w, g = _rand(o, d, seed=seed).to(dtype), _rand(d, seed=seed + 2).to(dtype)
    beta = _rand(d, seed=seed + 3).to(dtype)
    beta = torch.zeros_like(beta) if beta_zero else beta
    nw, nb = algebra.fold_norm_affine(w, None, g, beta)
    assert nw.dtype == dtype
    want = (w.double() * g.double()[None, :]).to(dtype)
    assert torch.equal(nw.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       want.view(torch.int16 if dtype != torch.float32 else torch.int32))
    if beta_zero:
        assert nb is None  # W @ 0 == 0 exactly for a finite W: no bias to add
    else:
        assert_within(nb, w.double() @ beta.double(),
                      2 * matmul_error_bound(beta.double()[None], w.double().T)[0])


@given(a=st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=64),
       b=st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=64),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_exact_product_matches_float64_on_extreme_values(a, b, dtype):
    """Overflow, subnormals, infinities and signed zeros: the same bits as the float64 route."""
    n = min(len(a), len(b))
    x, y = torch.tensor(a[:n]).to(dtype), torch.tensor(b[:n]).to(dtype)
    got, want = algebra.exact_product(x, y), (x.double() * y.double()).to(dtype)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    same = (got.view(bits) == want.view(bits)) | (got.isnan() & want.isnan())
    assert bool(same.all()), (x, y, got, want)


@given(d=dims, o=dims, per_channel=st.booleans(), seed=st.integers(0, 10_000))
def test_scale_rows(d, o, per_channel, seed):
    w, b, x = _rand(o, d, seed=seed), _rand(o, seed=seed + 1), _rand(3, d, seed=seed + 2)
    c = _rand(o, seed=seed + 3) if per_channel else torch.tensor(0.37, dtype=f64)
    nw, nb = algebra.scale_rows(w, b, c)
    want = c * F.linear(x, w, b)
    bound = (matmul_error_bound(x, nw.T, nb) + c.abs() * matmul_error_bound(x, w.T, b) + U * want.abs()
             + U * (x.abs() @ nw.abs().T + nb.abs()))  # nw = c w and nb = c b, each rounded once
    assert_within(F.linear(x, nw, nb), want, bound)


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
    bound = 0
    for a, bias, c, width in zip(w1, b1, w2, widths):
        got = got + F.linear(h, algebra.place_columns(c, total, torch.arange(offset, offset + width)))
        z = F.linear(x, a, bias)
        # per side: the first Linear's error through GELU's slope, GELU's own rounding, the second Linear
        dh = GELU_SLOPE * matmul_error_bound(x, a.T, bias) + GELU_ROUNDINGS * U * z.abs()
        h_abs = F.gelu(z).abs()
        branch_sum = gamma(len(widths), f64) * h_abs @ c.abs().T
        bound = bound + 2 * (dh @ c.abs().T + matmul_error_bound(h_abs + dh, c.T) + branch_sum)
        offset += width
    assert_within(got, want, bound)


@given(heads=st.integers(1, 4), dh=st.integers(1, 6), d=dims, seed=st.integers(0, 10_000))
def test_head_rows_round_trip(heads, dh, d, seed):
    w, b = _rand(heads * dh, d, seed=seed), _rand(heads * dh, seed=seed + 1)
    hw, hb = algebra.head_rows(w, b, heads)
    assert hw.shape == (heads, dh, d) and hb.shape == (heads, dh)
    assert torch.equal(hw.flatten(0, 1), w) and torch.equal(hb.flatten(0, 1), b)


@given(out=st.integers(1, 5), total=st.integers(1, 200), data=st.data())
def test_place_columns_puts_each_column_where_asked(out, total, data):
    """Any set of target columns (runs of heads, scattered, more than 64 runs), any order."""
    width = data.draw(st.integers(1, total))
    columns = torch.tensor(data.draw(st.permutations(range(total)))[:width])
    if data.draw(st.booleans()):
        columns = columns.sort().values
    w = torch.randn(out, width, generator=torch.Generator().manual_seed(width))
    got = algebra.place_columns(w, total, columns)
    want = torch.zeros(out, total)
    for j, c in enumerate(columns.tolist()):
        want[:, c] = w[:, j]
    assert got.dtype == w.dtype and torch.equal(got, want)


@given(dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), per_row=st.booleans(),
       c=st.sampled_from([0.5, 0.25, 1 / 3, 0.1, -2.0, 1e-3]), seed=st.integers(0, 10_000))
def test_scaling_a_model_dtype_weight_keeps_the_float64_bits(dtype, per_row, c, seed):
    """merge_affine scales a weight in its own dtype only when that is the float64 result: the factor must be
    representable in the dtype (0.1 and 1/3 are not, so those stay float64)."""
    t = _rand(6, 5, seed=seed).to(dtype)
    factor = torch.full((6,), c, dtype=f64) * torch.linspace(1, 2, 6, dtype=f64) if per_row else \
        torch.tensor(c, dtype=f64)
    got = algebra.scale_term(factor, t)
    exact = (factor[:, None] if per_row else factor) * t.double()
    if got.dtype == f64:
        assert torch.equal(got, exact)
    else:
        assert torch.equal(factor.to(dtype).double(), factor), \
            "scaled in the model dtype by an inexact factor"
        assert torch.equal(got, exact.to(dtype))


@given(n=st.integers(2, 5), dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
       rows=dims, cols=dims, seed=st.integers(0, 10_000))
def test_lazy_matrix_sums_have_the_bits_of_pairwise_float64_sums(n, dtype, rows, cols, seed):
    """merge_affine sums chains of matrices in place into one buffer: the bits of ((W1 + W2) + W3) + ...
    in float64, also when a chain is extended by a sum that was made first (then added as one value)."""
    from fxrep.affine.forms import _add_terms
    from fxrep.affine.forms import dense as _dense

    ws = [(_rand(rows, cols, seed=seed + i) * 10 ** (i - 2)).to(dtype) for i in range(n)]
    acc, want = ws[0], ws[0].double()
    for w in ws[1:]:
        acc, want = _add_terms(acc, w), want + w.double()
    assert torch.equal(_dense(acc), want)
    right = _add_terms(ws[0], ws[1])  # a + (b + c): the right sum is computed first
    got = _dense(_add_terms(ws[-1], right))
    assert torch.equal(got, ws[-1].double() + (ws[0].double() + ws[1].double()))
