"""The cost rule for widening (fxrep.cost): with example inputs, each widen group is timed in both forms at the
real shape and kept apart where one wide op is clearly slower; without a shape it widens as before and the
report says it was not timed. The decision itself is forced here through ``cost.MARGIN`` (timings are
machine-dependent); what is tested is that either decision is exact and reported with its numbers."""

import pytest
import torch

import fxrep
from fxrep import cost
from fxrep.pattern import FuseContext
from fxrep.testing import (
    AttentionSpec,
    GeneratedAttentionBlock,
    GeneratedMlpBlock,
    MlpSpec,
    assert_fused_equivalent,
    make_inputs,
)


def _blocks(kind: str):
    if kind == "mlp":
        return GeneratedMlpBlock(MlpSpec(dim=16, hidden=32, branches=3, lam=None, seed=1)), "widen_mlp", "activation"
    return GeneratedAttentionBlock(AttentionSpec(dim=16, heads=2, branches=3, lam=None, seed=1)), "widen_attention", \
        "sdpa"


@pytest.fixture(autouse=True)
def _time_every_group(monkeypatch):
    monkeypatch.setattr(cost, "MIN_MACS", 0)  # the test models are small: time them all the same


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_with_a_shape_widening_is_timed_and_reported(kind):
    model, pattern, op = _blocks(kind)
    x = make_inputs(16, torch.float32)
    gm = assert_fused_equivalent(model, x)
    report = gm.meta["fxrep_report"]
    widened = [a for a in report.applied if a.pattern == pattern]
    kept = [s for s in report.skipped if s.pattern == pattern]
    assert len(widened) + len(kept) == 1, report
    text = (widened or kept)[0].summary if widened else kept[0].reason
    assert f"timed on input {tuple(x[0].shape)}" in text and "as 3 branches" in text, text


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_where_the_wide_form_is_slower_the_branches_stay_apart(kind, monkeypatch):
    monkeypatch.setattr(cost, "MARGIN", 0.0)  # no wide form "pays": every group is priced as slower
    model, pattern, op = _blocks(kind)
    x = make_inputs(16, torch.float32)
    gm = assert_fused_equivalent(model, x)
    report = gm.meta["fxrep_report"]
    assert report.after[op] == 3 and not [a for a in report.applied if a.pattern == pattern], report
    (skip,) = [s for s in report.skipped if s.pattern == pattern]
    assert "widening would be slower at this shape" in skip.reason and "ms as one op" in skip.reason


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_without_a_shape_widening_is_not_timed(kind, monkeypatch):
    monkeypatch.setattr(cost, "MARGIN", 0.0)  # would keep them apart, if anything were timed
    model, pattern, op = _blocks(kind)
    gm = fxrep.fuse(model)
    report = gm.meta["fxrep_report"]
    (applied,) = [a for a in report.applied if a.pattern == pattern]
    assert report.after[op] == 1 and "not timed: no input shape known" in applied.summary
    x = make_inputs(16, torch.float32)
    torch.testing.assert_close(gm(*x), model(*x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_groups_too_small_to_time_reliably_widen(kind, monkeypatch):
    monkeypatch.setattr(cost, "MIN_MACS", 2 ** 24)
    monkeypatch.setattr(cost, "MARGIN", 0.0)
    model, pattern, op = _blocks(kind)
    gm = assert_fused_equivalent(model, make_inputs(16, torch.float32))
    report = gm.meta["fxrep_report"]
    (applied,) = [a for a in report.applied if a.pattern == pattern]
    assert report.after[op] == 1 and "too small to time reliably" in applied.summary, applied.summary


def test_a_model_on_another_device_is_not_timed_on_the_cpu():
    gm = torch.fx.symbolic_trace(torch.nn.Linear(3, 3))
    for node in gm.graph.nodes:
        node.meta["tensor_meta"] = type("Meta", (), {"shape": torch.Size([2, 3])})()
    x = next(iter(gm.graph.nodes))
    ctx = FuseContext(gm)
    assert cost.input_shape(ctx, x) == (2, 3)
    gm.meta[cost.DEVICE_KEY] = torch.device("cuda")
    assert cost.input_shape(ctx, x) is None and "runs on cuda" in cost.untimed_note(ctx)


def test_timings_are_measured_once_per_shape():
    model = torch.nn.Sequential(*[GeneratedMlpBlock(MlpSpec(dim=16, hidden=32, branches=2, lam=None, seed=i))
                                  for i in range(4)]).eval()
    x = make_inputs(16, torch.float32)
    calls = []
    original = cost._best_of
    try:
        cost._best_of = lambda forms: calls.append(1) or original(forms)
        gm = fxrep.fuse(model, example_inputs=x)
    finally:
        cost._best_of = original
    assert len(calls) == 1  # four blocks of one shape
    assert gm.meta["fxrep_report"].after["activation"] in (4, 8)
