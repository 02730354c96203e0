"""User patterns go through the same API as the built-ins: register, list, disable, reorder, check."""

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

import fxrep
from fxrep.ir import as_linear, emit_linear, fetch_attr
from fxrep.testing import GeneratedMlpBlock, MlpSpec, assert_fused_equivalent, make_inputs


# --- the README's custom pattern, verbatim ---------------------------------------------------------------
class FoldBatchNormIntoLinear:
    """linear(x) -> BatchNorm1d over (batch, features) in eval mode  ==>  one linear."""

    name = "fold_batchnorm_into_linear"
    phase = "fuse"

    def match(self, node, ctx):
        if node.op != "call_module" or not isinstance(fetch_attr(ctx.gm, node.target), nn.BatchNorm1d):
            return None
        lin = as_linear(node.args[0])
        if lin is None:
            return None
        if len(lin.node.users) > 1:
            return fxrep.Skip([node], "the Linear output is also read elsewhere")
        meta = node.meta.get("tensor_meta")
        if meta is None or len(meta.shape) != 2:
            return fxrep.Skip([node], "BatchNorm1d folds only on (batch, features) inputs: pass "
                                      "example_inputs")
        return fxrep.Match([lin.node, node], lin, "BatchNorm1d folded into the Linear before it")

    def replace(self, match, ctx):
        lin, bn_node = match.data, match.nodes[1]
        bn = fetch_attr(ctx.gm, bn_node.target)
        f64 = torch.float64
        scale = torch.rsqrt(bn.running_var.to(f64) + bn.eps)
        shift = -bn.running_mean.to(f64) * scale
        if bn.affine:
            scale, shift = scale * bn.weight.to(f64), shift * bn.weight.to(f64) + bn.bias.to(f64)
        weight = lin.weight.to(f64) * scale[:, None]
        bias = (lin.bias.to(f64) * scale if lin.bias is not None else 0) + shift
        with ctx.graph.inserting_before(bn_node):
            new = emit_linear(ctx.graph, lin.input, weight, bias, lin.weight.dtype, bn_node.name)
        ctx.replace_node(bn_node, new)
# ---------------------------------------------------------------------------------------------------------


class Head(nn.Module):
    def __init__(self, d, c, affine, bias):
        super().__init__()
        self.fc = nn.Linear(d, c, bias=bias)
        self.bn = nn.BatchNorm1d(c, affine=affine)

    def forward(self, x):
        return self.bn(self.fc(x))


@given(d=st.integers(1, 16), c=st.integers(1, 16), affine=st.booleans(), bias=st.booleans(),
       eps=st.sampled_from([1e-5, 1e-3]), dtype=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 1000))
def test_custom_batchnorm_pattern_is_exact(d, c, affine, bias, eps, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    model = Head(d, c, affine, bias)
    model.bn.eps = eps
    with torch.no_grad():  # non-trivial statistics, or the fold proves nothing
        model.bn.running_mean.copy_(torch.randn(c, generator=g))
        model.bn.running_var.copy_(torch.rand(c, generator=g) + 0.1)
        if affine:
            model.bn.weight.copy_(torch.randn(c, generator=g))
            model.bn.bias.copy_(torch.randn(c, generator=g))
    model = model.to(dtype).eval()
    registry = fxrep.default_registry()
    registry.register(FoldBatchNormIntoLinear(), before="merge_affine")
    x = (torch.randn(4, d, generator=g).to(dtype),)
    gm = assert_fused_equivalent(model, x, patterns=registry)
    assert gm.meta["fxrep_report"].count("fold_batchnorm_into_linear") == 1
    assert not any(n.op == "call_module" for n in gm.graph.nodes)


def test_registry_lists_disables_and_reorders():
    registry = fxrep.default_registry()
    names = registry.names()
    assert names[0] == "drop_identity" and "merge_affine" in names and "lift_attention" in names
    without = registry.without("widen_mlp")
    assert "widen_mlp" not in without.names() and "widen_mlp" in registry.names()
    reordered = registry.reordered(["widen_mlp"])
    assert reordered.names()[0] == "widen_mlp"
    model = GeneratedMlpBlock(MlpSpec(branches=3, lam=None))
    x = make_inputs(8, torch.float32)
    gm = assert_fused_equivalent(model, x, patterns=without)
    assert gm.meta["fxrep_report"].count("widen_mlp") == 0
    assert gm.meta["fxrep_report"].after["activation"] == 3


def test_registering_a_name_twice_is_an_error():
    registry = fxrep.default_registry()
    with pytest.raises(fxrep.PatternError, match="already registered"):
        registry.register(FoldBatchNormIntoLinear())
        registry.register(FoldBatchNormIntoLinear())
    with pytest.raises(fxrep.PatternError, match="already registered"):
        fxrep.default_registry().with_pattern(
            fxrep.FunctionPattern("merge_affine", lambda n, c: None, lambda m, c: None))


def test_registries_are_values():
    """with_pattern returns a new registry; nothing a user adds reaches another registry or the defaults."""
    p = fxrep.FunctionPattern("noop_for_test", lambda n, c: None, lambda m, c: None)
    base = fxrep.default_registry()
    mine = base.with_pattern(p, after="merge_affine")
    names = mine.names()
    assert names[names.index("merge_affine") + 1] == "noop_for_test"
    assert "noop_for_test" not in base.names()
    assert "noop_for_test" not in fxrep.default_registry().names()
    assert mine.without("noop_for_test").names() == base.names()
    assert not hasattr(fxrep, "register_pattern")


def _break_first_linear(node, ctx):
    lin = as_linear(node)
    return fxrep.Match([node], lin, "scales a Linear by 2 (wrong on purpose)") if lin is not None and \
        not node.meta.get("broken") else None


def _replace_broken(match, ctx):
    lin = match.data
    with ctx.graph.inserting_before(lin.node):
        new = emit_linear(ctx.graph, lin.input, lin.weight.double() * 2, None, lin.weight.dtype, "broken")
    new.meta["broken"] = True
    ctx.replace_node(lin.node, new)


def test_a_wrong_custom_pattern_is_caught_by_check_and_by_testing():
    registry = fxrep.default_registry()
    registry.register(fxrep.FunctionPattern("broken", _break_first_linear, _replace_broken))
    model = GeneratedMlpBlock(MlpSpec(branches=2))
    x = make_inputs(8, torch.float32)
    with pytest.raises(fxrep.EquivalenceError, match="custom pattern"):
        fxrep.fuse(model, example_inputs=x, patterns=registry, check=True)
    with pytest.raises(fxrep.EquivalenceError, match="does not compute"):
        assert_fused_equivalent(model, x, patterns=registry)


def test_a_pattern_without_match_is_rejected():
    with pytest.raises(fxrep.PatternError, match="match"):
        fxrep.PatternRegistry([object()])
