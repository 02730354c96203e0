"""Unit tests of the layout patterns (permutes and reshapes moved across Linears and sums), each run alone on
small models: what each rewrites, the near misses it must leave alone, and that the result is exact."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from fxrep.patterns import (
    CancelPermutes,
    ExtractLayerNormAffine,
    FunctionalizeModules,
    PermutesOutOfSums,
    UnflattenLinearRows,
)
from fxrep.testing import assert_fused_equivalent

REARRANGE = {torch.permute, torch.transpose, "permute", "transpose"}


class Fn(nn.Module):
    def __init__(self, fn, width=4, out=6):
        super().__init__()
        self.fn = fn
        self.lin = nn.Linear(width, out)

    def forward(self, x, y=None):
        return self.fn(self, x) if y is None else self.fn(self, x, y)


def fuse_with(pattern, fn, *xs, **kw):
    """Fuse ``fn`` with ``pattern`` alone (after ``nn.Linear`` calls become ``F.linear``), checked exact."""
    gm = assert_fused_equivalent(Fn(fn, **kw).eval(), xs, patterns=[FunctionalizeModules(), pattern])
    return gm, gm.meta["fxrep_report"]


def rearranges(gm) -> int:
    return sum(n.target in REARRANGE for n in gm.graph.nodes if n.op in ("call_function", "call_method"))


def inverse(p):
    return [p.index(i) for i in range(len(p))]


@st.composite
def shapes_and_perms(draw):
    rank = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank)))
    return shape, draw(st.permutations(range(rank)))


# -- cancel_permutes ----------------------------------------------------------------------------------------

@given(shapes_and_perms(), st.booleans())
def test_a_permute_and_its_inverse_cancel(shape_perm, as_method):
    shape, p = shape_perm
    q = inverse(p)
    if as_method:
        fn = lambda m, x: x.permute(*p).permute(q) + 1  # noqa: E731
    else:
        fn = lambda m, x: torch.permute(torch.permute(x, p), q) + 1  # noqa: E731
    gm, report = fuse_with(CancelPermutes(), fn, torch.randn(shape))
    assert rearranges(gm) == 0 and report.count("cancel_permutes") == 1


@given(shapes_and_perms(), st.permutations(range(4)))
def test_permutes_that_do_not_cancel_are_kept(shape_perm, q):
    shape, p = shape_perm
    q = [i for i in q if i < len(p)]
    if [p[i] for i in q] == sorted(p):
        q = q[1:] + q[:1]  # a near miss: q does not undo p
    gm, report = fuse_with(CancelPermutes(), lambda m, x: x.permute(*p).permute(*q) + 1, torch.randn(shape))
    assert rearranges(gm) == 2 and report.count("cancel_permutes") == 0


def test_a_returned_permute_pair_is_kept_as_written():
    gm, report = fuse_with(CancelPermutes(), lambda m, x: x.transpose(0, 1).transpose(0, 1),
                           torch.randn(2, 3))
    assert report.count("cancel_permutes") == 0 and rearranges(gm) == 2


@given(rank=st.integers(3, 4), dims=st.sampled_from([(0, 1), (0, -2), (1, 0)]), spelling=st.integers(0, 2))
def test_transposes_around_a_linear_cancel_when_they_keep_the_last_axis(rank, dims, spelling):
    shape = (2, 3, 5, 4)[-rank:]
    transpose = [lambda x: x.transpose(*dims), lambda x: torch.transpose(x, *dims),
                 lambda x: torch.swapaxes(x, *dims)][spelling]
    gm, report = fuse_with(CancelPermutes(), lambda m, x: transpose(m.lin(transpose(x))) * 2,
                           torch.randn(shape))
    assert rearranges(gm) == 0 and report.count("cancel_permutes") == 1


def test_transposes_of_the_last_axis_around_a_linear_are_kept():
    """``linear`` acts on the last axis, so it does not commute with a transpose that moves that axis."""
    gm, report = fuse_with(CancelPermutes(), lambda m, x: m.lin(x.transpose(1, 2)).transpose(1, 2),
                           torch.randn(2, 4, 4), width=4, out=4)
    assert report.count("cancel_permutes") == 0 and rearranges(gm) == 2


def test_a_linear_read_twice_keeps_its_transposes():
    def fn(m, x):
        y = m.lin(x.transpose(0, 1))
        return y.transpose(0, 1), y * 2

    gm, report = fuse_with(CancelPermutes(), fn, torch.randn(2, 3, 4))
    assert report.count("cancel_permutes") == 0 and rearranges(gm) == 2


# -- permutes_out_of_sums ---------------------------------------------------------------------------------

@given(shapes_and_perms(), st.sampled_from(["add", "sub", "zero"]))
def test_one_permute_moves_out_of_a_sum(shape_perm, op):
    shape, p = shape_perm
    if op == "add":
        fn = lambda m, x, y: (x.permute(*p) + y.permute(*p)) * 2  # noqa: E731
    elif op == "sub":
        fn = lambda m, x, y: (x.permute(*p) - y.permute(*p)) * 2  # noqa: E731
    else:
        fn = lambda m, x, y: (x.permute(*p) + 0) * y.permute(*p)  # noqa: E731
    gm, report = fuse_with(PermutesOutOfSums(), fn, torch.randn(shape), torch.randn(shape))
    assert report.count("permutes_out_of_sums") == 1
    assert rearranges(gm) == (1 if op != "zero" else 2)


@given(shapes_and_perms())
def test_broadcast_terms_move_too(shape_perm):
    shape, p = shape_perm
    other = (1,) + shape[1:]
    gm, report = fuse_with(PermutesOutOfSums(), lambda m, x, y: (x.permute(*p) + y.permute(*p)).sum(),
                           torch.randn(shape), torch.randn(other))
    assert report.count("permutes_out_of_sums") == 1


def test_products_and_mixed_permutes_are_kept():
    x, y = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    gm, report = fuse_with(PermutesOutOfSums(), lambda m, a, b: a.transpose(0, 1) * b.transpose(0, 1), x, y)
    assert report.count("permutes_out_of_sums") == 0
    gm, report = fuse_with(PermutesOutOfSums(),
                           lambda m, a, b: a.transpose(0, 1) + b.permute(1, 0, 2)[:, :, :1], x, y)
    assert report.count("permutes_out_of_sums") == 0
    square = torch.randn(3, 3, 4)
    gm, report = fuse_with(PermutesOutOfSums(), lambda m, a, b: a.transpose(0, 1) + b.permute(1, 0, 2),
                           square, square.clone())
    assert report.count("permutes_out_of_sums") == 1
    gm, report = fuse_with(PermutesOutOfSums(), lambda m, a, b: a.transpose(0, 1) + b.transpose(1, 2), square,
                           torch.randn(3, 4, 3))
    assert report.count("permutes_out_of_sums") == 0


def test_a_sum_read_by_view_keeps_its_permutes():
    """``.view`` depends on the strides, which moving the permute changes."""
    gm, report = fuse_with(PermutesOutOfSums(),
                           lambda m, a, b: (a.transpose(0, 1) + b.transpose(0, 1)).view(3, 2),
                           torch.randn(2, 3), torch.randn(2, 3))
    assert report.count("permutes_out_of_sums") == 0


# -- unflatten_linear_rows --------------------------------------------------------------------------------

@given(batch=st.integers(1, 3), tokens=st.integers(1, 4), by_view=st.booleans())
def test_rows_flattened_around_a_linear_split_before_it(batch, tokens, by_view):
    def fn(m, x):
        rows = x.reshape(batch * tokens, 4)
        y = m.lin(rows)
        return (y.view(batch, tokens, 6) if by_view else y.reshape(batch, tokens, 6)) + 1

    gm, report = fuse_with(UnflattenLinearRows(), fn, torch.randn(tokens, batch, 4))
    assert report.count("unflatten_linear_rows") == 1
    linear = next(n for n in gm.graph.nodes if n.target is F.linear)
    assert len(linear.meta["tensor_meta"].shape) == 3


def test_a_view_that_changes_the_features_is_kept():
    def fn(m, x):
        return m.lin(x.reshape(6, 4)).view(2, 3, 2, 3) + 1

    gm, report = fuse_with(UnflattenLinearRows(), fn, torch.randn(2, 3, 4))
    assert report.count("unflatten_linear_rows") == 0


def test_a_flattened_linear_read_twice_is_kept():
    def fn(m, x):
        y = m.lin(x.reshape(6, 4))
        return y.view(2, 3, 6), y.sum()

    gm, report = fuse_with(UnflattenLinearRows(), fn, torch.randn(2, 3, 4))
    assert report.count("unflatten_linear_rows") == 0


# -- LayerNorm affine through a leading-axis permute -----------------------------------------------------

class TransposedNormLinear(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.dims = dims
        self.norm = nn.LayerNorm(4)
        self.lin = nn.Linear(4, 6)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-1, 1)

    def forward(self, x):
        return self.lin(self.norm(x).transpose(*self.dims))


def test_layernorm_affine_folds_through_a_leading_axis_transpose():
    gm = assert_fused_equivalent(TransposedNormLinear((0, 1)).eval(), (torch.randn(2, 3, 4),),
                                 patterns=[FunctionalizeModules(), ExtractLayerNormAffine()])
    assert gm.meta["fxrep_report"].count("extract_layernorm_affine") == 1


def test_layernorm_affine_is_kept_before_a_transpose_of_the_features():
    gm = assert_fused_equivalent(TransposedNormLinear((1, 2)).eval(), (torch.randn(2, 4, 4),),
                                 patterns=[FunctionalizeModules(), ExtractLayerNormAffine()])
    assert gm.meta["fxrep_report"].count("extract_layernorm_affine") == 0
