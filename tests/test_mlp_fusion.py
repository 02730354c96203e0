"""Property tests of MLP widening and joining (docs/identities.md §1-4) on generated branched blocks."""

import pytest
import torch
from helpers import activations, hidden_widths, stats
from hypothesis import given, settings
from hypothesis import strategies as st

import fxrep
from fxrep.affine import AffineAnalysis, FormKey
from fxrep.engine import run_patterns
from fxrep.registry import PatternRegistry, default_registry
from fxrep.report import FuseReport
from fxrep.testing import (
    GeneratedMlpBlock,
    MlpSpec,
    assert_fused_equivalent,
    branched_mlp_blocks,
    graph_code,
    make_inputs,
    random_graphs,
)


@given(branched_mlp_blocks())
def test_fused_mlp_blocks_are_equivalent_and_merged(case):
    spec = case.info["spec"]
    gm = assert_fused_equivalent(case.model, case.inputs)
    expect = spec.expect()
    assert len(activations(gm)) == expect["activations"]
    assert hidden_widths(gm, case.inputs) == expect["widths"]
    if spec.norm != "none":
        assert stats(gm)["layer_norm"] == 1, "branches normalizing one tensor share one affine-free norm"


@settings(max_examples=40)
@given(branched_mlp_blocks(near_miss=True))
def test_near_misses_are_left_unmerged_and_exact(case):
    spec = case.info["spec"]
    gm = assert_fused_equivalent(case.model, case.inputs)
    expect = spec.expect()
    if expect["activations"] is not None:
        assert len(activations(gm)) == expect["activations"]
        assert hidden_widths(gm, case.inputs) == expect["widths"], "only like branches may merge"


def test_joined_four_branch_block_is_one_gelu_and_two_linears():
    model = GeneratedMlpBlock(MlpSpec(dim=16, hidden=64, branches=4, lam=1.0))
    x = make_inputs(16, torch.float32)
    gm = assert_fused_equivalent(model, x)
    s = stats(gm)
    assert (s["activation"], s["linear"]) == (1, 2)
    assert hidden_widths(gm, x) == [64]


def test_widened_four_branch_block_is_one_gelu_with_four_times_hidden():
    model = GeneratedMlpBlock(MlpSpec(dim=16, hidden=64, branches=4, lam=None))
    x = make_inputs(16, torch.float32)
    gm = assert_fused_equivalent(model, x)
    s = stats(gm)
    assert (s["activation"], s["linear"]) == (1, 2)
    assert hidden_widths(gm, x) == [256]


def test_partially_joined_block_is_still_widened_exactly():
    model = GeneratedMlpBlock(MlpSpec(dim=8, hidden=8, branches=3, lam=0.3, dtype=torch.float64))
    x = make_inputs(8, torch.float64)
    gm = assert_fused_equivalent(model, x)  # float64: MODEL_RTOL[float64]
    assert hidden_widths(gm, x) == [24]


def test_different_layernorm_eps_is_reported():
    model = GeneratedMlpBlock(MlpSpec(branches=2, near_miss="eps", lam=None))
    gm = fxrep.fuse(model)
    reasons = [s.reason for s in gm.meta["fxrep_report"].skipped]
    assert any("different LayerNorm eps" in r for r in reasons), reasons


def test_fuse_does_not_touch_the_input_model():
    model = GeneratedMlpBlock(MlpSpec(branches=3, lam=1.0))
    traced = torch.fx.symbolic_trace(model)
    code, state = traced.code, {k: v.clone() for k, v in traced.state_dict().items()}
    fused = fxrep.fuse(traced)
    assert traced.code == code and graph_code(traced) == code
    for k, v in traced.state_dict().items():
        assert torch.equal(v, state[k]) and v.dtype == state[k].dtype
    assert fused is not traced and fused.code != code
    fused_params = {id(p) for p in fused.parameters()}
    assert not fused_params & {id(p) for p in model.parameters()}, "merged weights must be new tensors"


def _analysis_summary(analysis):
    regions = [(tuple(r.stops), tuple(sorted((f, tuple(sorted(c, key=analysis.order.get)))
                                             for f, c in r.cones.items())))
               for r in analysis.regions]
    return analysis.stop, regions


@settings(max_examples=40, deadline=None)
@given(st.one_of(branched_mlp_blocks(near_miss=None), random_graphs()))
def test_seeded_stop_nodes_reach_the_same_fixed_point(case):
    """merge_affine starts its stop-node fixed point from the nodes read by non-affine ops (fast with the
    memo); stop nodes, regions and the forms of stop nodes must be what the fixed point from no stop nodes
    gives."""
    gm = fxrep.trace(case.model)
    early = [p for p in default_registry()
             if ({p.phase} if isinstance(p.phase, str) else set(p.phase)) & {"canonicalize", "lift"}]
    run_patterns(gm, PatternRegistry(early), FuseReport())  # the graph merge_affine first sees
    seeded, plain = AffineAnalysis(gm.graph, seed_stops=True), AffineAnalysis(gm.graph, seed_stops=False)
    assert _analysis_summary(seeded) == _analysis_summary(plain)
    for f in seeded.stop:
        assert FormKey(seeded.forms[f], seeded.order) == FormKey(plain.forms[f], plain.order)


def test_a_branch_whose_pre_activation_is_read_elsewhere_is_reported():
    model = GeneratedMlpBlock(MlpSpec(branches=3, near_miss="leak", lam=None))
    gm = assert_fused_equivalent(model, make_inputs(8, torch.float32))
    report = gm.meta["fxrep_report"]
    assert report.after["activation"] == 2  # the other two widen
    assert any("also read by another op" in s.reason for s in report.skipped if s.pattern == "widen_mlp")


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_joined_branches_whose_pre_activation_leaks_are_reported(lam):
    """Partly joined (or lam = 0 written as a mix) branches whose Linear ``fc1_0`` is also an output: their
    pre-activations stay sums of Linears, and the report says why, once (as the last sweep sees it)."""
    model = GeneratedMlpBlock(MlpSpec(branches=3, near_miss="leak", lam=lam))
    gm = assert_fused_equivalent(model, make_inputs(8, torch.float32))
    reasons = [s.reason for s in gm.meta["fxrep_report"].skipped if s.pattern == "widen_mlp"]
    assert len(reasons) == 1, reasons
    assert "are sums of Linears" in reasons[0] and "also read elsewhere" in reasons[0], reasons


def test_partly_joined_branches_that_widen_leave_no_provisional_reason():
    model = GeneratedMlpBlock(MlpSpec(branches=3, lam=0.5))
    gm = assert_fused_equivalent(model, make_inputs(8, torch.float32))
    assert not [s for s in gm.meta["fxrep_report"].skipped if "sums of Linears" in s.reason]
