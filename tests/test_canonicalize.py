"""Unit tests of the canonicalize patterns and CSE, each run alone on small models: what each one rewrites,
what it must leave alone, and that the result is exact."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import fxrep
from fxrep.patterns import (
    DropEmptyAttentionMask,
    DropIdentity,
    EliminateCommonSubexpressions,
    FoldConstants,
    FunctionalizeModules,
)
from fxrep.testing import assert_fused_equivalent


class Fn(nn.Module):
    def __init__(self, fn, **modules):
        super().__init__()
        self.fn = fn
        for name, m in modules.items():
            setattr(self, name, m)
        self.w = nn.Parameter(torch.randn(6, 4))
        self.register_buffer("lam", torch.tensor(0.25))
        self.register_buffer("table", torch.randn(5, 4))

    def forward(self, x):
        return self.fn(self, x)


def fuse_with(pattern, fn, x=None, **modules):
    model = Fn(fn, **modules).eval()
    gm = assert_fused_equivalent(model, (torch.randn(3, 4) if x is None else x,), patterns=[pattern])
    return gm, gm.meta["fxrep_report"]


def targets(gm):
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]


# -- drop_identity ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("module", [nn.Identity(), nn.Dropout(0.3), nn.Dropout1d(0.1), nn.AlphaDropout(0.2)])
def test_identity_modules_are_dropped(module):
    gm, report = fuse_with(DropIdentity(), lambda m, x: m.id(x) + 1, id=module)
    assert targets(gm) == [targets(gm)[0]] and report.count("drop_identity") == 1


@pytest.mark.parametrize("fn", [lambda m, x: F.dropout(x, 0.1, False) + 1,
                                lambda m, x: F.dropout(x, p=0.0) + 1,
                                lambda m, x: F.dropout(x, training=m.training) + 1])
def test_eval_dropout_calls_are_dropped(fn):
    gm, _ = fuse_with(DropIdentity(), fn)
    assert F.dropout not in targets(gm)


def test_training_dropout_is_kept_with_the_reason():
    model = Fn(lambda m, x: F.dropout(x, 0.1) + 1).eval()
    gm = fxrep.fuse(model, patterns=[DropIdentity()])
    assert F.dropout in targets(gm)
    assert "training=True" in gm.meta["fxrep_report"].skipped[0].reason


def test_contiguous_is_dropped_only_where_no_reader_sees_the_layout():
    gm, _ = fuse_with(DropIdentity(), lambda m, x: F.linear(x.t().contiguous().t(), m.w))
    assert "contiguous" not in targets(gm)
    gm, _ = fuse_with(DropIdentity(), lambda m, x: x.t().contiguous().view(-1))
    assert "contiguous" in targets(gm)


# -- functionalize_modules --------------------------------------------------------------------------------

@pytest.mark.parametrize("module, function", [
    (nn.Linear(4, 4), F.linear), (nn.LayerNorm(4, eps=1e-3), F.layer_norm),
    (nn.GELU(approximate="tanh"), F.gelu), (nn.Softmax(dim=-1), F.softmax), (nn.LeakyReLU(0.3), F.leaky_relu),
    (nn.ELU(2.0), F.elu), (nn.SiLU(), F.silu), (nn.Tanh(), torch.tanh), (nn.Hardswish(), F.hardswish),
])
def test_modules_become_functional_calls(module, function):
    gm, _ = fuse_with(FunctionalizeModules(), lambda m, x: m.mod(x) * 2, mod=module)
    assert function in targets(gm) and not any(isinstance(t, str) and t == "mod" for t in targets(gm))


def test_an_inplace_activation_becomes_functional_only_where_its_write_is_invisible():
    gm, _ = fuse_with(FunctionalizeModules(), lambda m, x: m.act(F.linear(x, m.w)), act=nn.ReLU(inplace=True))
    assert F.relu in targets(gm)
    gm, _ = fuse_with(FunctionalizeModules(), lambda m, x: m.act(x * 1) + x, act=nn.ReLU(inplace=True))
    assert F.relu in targets(gm)  # x * 1 owns its memory and only the activation reads it
    gm, _ = fuse_with(FunctionalizeModules(), lambda m, x: (lambda y: m.act(y) + y)(x * 1),
                      act=nn.ReLU(inplace=True))
    assert "act" in targets(gm)  # y is read again after the write: the module call stays


# -- fold_constants ---------------------------------------------------------------------------------------

def test_scalar_and_per_channel_constants_are_folded():
    gm, report = fuse_with(FoldConstants(), lambda m, x: x * (1 - m.w[0, 0]) + x * m.w.sum(0))
    assert report.count("fold_constants") >= 2
    assert all(t in (torch.mul, torch.add) or getattr(t, "__name__", "") in ("mul", "add")
               for t in targets(gm))


@pytest.mark.parametrize("fn", [
    lambda m, x: x[:, :1] + m.table.half().float()[:3],   # a table, not a scalar or channel vector
    lambda m, x: x + torch.rand_like(m.lam),               # random
])
def test_tables_and_random_ops_are_not_folded(fn):
    model = Fn(fn).eval()
    gm = fxrep.fuse(model, patterns=[FoldConstants()])
    assert gm.meta["fxrep_report"].count("fold_constants") == 0


def test_folding_never_writes_the_users_tensor():
    model = Fn(lambda m, x: x * m.lam.add_(0)).eval()
    before = model.lam.clone()
    gm = fxrep.fuse(model, patterns=[FoldConstants()])
    assert gm.meta["fxrep_report"].count("fold_constants") == 0 and torch.equal(model.lam, before)


# -- drop_empty_attention_mask ----------------------------------------------------------------------------

class TimmAttention(nn.Module):
    """timm's non-fused attention path: ``maybe_add_mask(scores, resolve_self_attn_mask(...))``."""

    def __init__(self, causal: bool):
        super().__init__()
        from timm.layers import Attention

        self.attn, self.causal = Attention(4, num_heads=2), causal
        self.attn.fused_attn = False

    def forward(self, x):
        return self.attn(x, is_causal=self.causal)


@pytest.mark.parametrize("causal", [False, True])
def test_timms_empty_mask_is_dropped_and_a_causal_one_kept(causal):
    gm = assert_fused_equivalent(TimmAttention(causal).eval(), (torch.randn(2, 3, 4),),
                                 patterns=[DropEmptyAttentionMask()])
    names = [getattr(t, "__name__", "") for t in targets(gm)]
    assert gm.meta["fxrep_report"].count("drop_empty_attention_mask") == (0 if causal else 1)
    assert ("maybe_add_mask" in names) == causal


# -- eliminate_common_subexpressions ----------------------------------------------------------------------

def cse(fn, x=None):
    return fuse_with(EliminateCommonSubexpressions(), fn, x)


@given(scale=st.floats(-4, 4, allow_nan=False), k=st.integers(1, 4))
def test_equal_pure_nodes_are_merged(scale, k):
    gm, _ = cse(lambda m, x: [F.linear(x * scale, m.w) for _ in range(k)])
    assert targets(gm).count(F.linear) == 1


def test_arguments_that_only_look_equal_are_not_merged():
    gm, _ = cse(lambda m, x: (x * 0.0, x * -0.0))  # 0.0 and -0.0 are different floats
    assert len(targets(gm)) == 2
    gm, _ = cse(lambda m, x: (x.sum(0), x.sum(1)))
    assert len(targets(gm)) == 2


@pytest.mark.parametrize("fn", [
    lambda m, x: (torch.rand_like(x), torch.rand_like(x)),                 # random: two draws
    lambda m, x: (F.dropout(x, 0.5), F.dropout(x, 0.5)),
])
def test_random_ops_are_never_merged(fn):
    gm = fxrep.fuse(Fn(fn).eval(), patterns=[EliminateCommonSubexpressions()])
    assert len(targets(gm)) == 2


def test_guards_and_values_written_in_place_are_never_merged():
    def guards(m, x):
        torch._assert(x.shape[0] > 0, "empty")
        torch._assert(x.shape[0] > 0, "empty")
        return x + 1

    gm = fxrep.fuse(Fn(guards).eval(), patterns=[EliminateCommonSubexpressions()])
    assert targets(gm).count(torch._assert) == 2

    def written(m, x):
        a, b = x + 1, x + 1
        a.mul_(2)
        return a, b

    gm, _ = cse(written)
    assert len([t for t in targets(gm) if getattr(t, "__name__", t) == "add"]) == 2
