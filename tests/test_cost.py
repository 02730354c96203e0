"""The cost models for widening (fxrep.cost): the default table model prices both forms of a widen group from
kernel times shipped with fxrep, so the same call gives the same graph on any machine and under any load;
``autotune=True`` times them instead and records its decisions, which ``decisions=`` replays without timing.
Either decision is exact: what is tested here is which one is taken, where it is recorded, and that the
choice depends on nothing but the model, its inputs and the options."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxrep
from fxrep import cost
from fxrep.engine import run_patterns
from fxrep.pattern import FuseContext, FuseOptions
from fxrep.report import FuseReport
from fxrep.stats import graph_stats
from fxrep.testing import (
    AttentionSpec,
    GeneratedAttentionBlock,
    GeneratedMlpBlock,
    MlpSpec,
    assert_fused_equivalent,
    make_inputs,
)

CPU = torch.device("cpu")
DIM = 128  # groups of these blocks at (2, 64, DIM) are over the 2^24 multiply-add floor: they are priced


def _blocks(kind: str):
    if kind == "mlp":
        return GeneratedMlpBlock(MlpSpec(dim=DIM, hidden=512, branches=3, lam=None, seed=1)), "widen_mlp", \
            "activation"
    return GeneratedAttentionBlock(AttentionSpec(dim=DIM, heads=2, head_dim=64, branches=3, lam=None,
                                                 seed=1)), \
        "widen_attention", "sdpa"


def _inputs():
    return make_inputs(DIM, torch.float32, tokens=64)


def _fuse_with(model, x, cost_model, device=CPU):
    """Fuse through the engine with an injected cost model (the front door builds the same options)."""
    gm = fxrep.trace(model)
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(gm).propagate(*x)
    report = FuseReport()
    run_patterns(gm, fxrep.default_registry(), report, options=FuseOptions(device, cost_model))
    gm.recompile()
    return gm, report


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_by_default_the_table_decides_and_the_decision_is_recorded(kind):
    model, pattern, op = _blocks(kind)
    x = _inputs()
    gm = assert_fused_equivalent(model, x)
    report = gm.meta["fxrep_report"]
    (decision,) = report.decisions.values()
    assert decision.source == "table" and decision.branches == 3
    assert "kernel-time table" in report.cost_model and "widening decided by" in str(report)
    widened = [a for a in report.applied if a.pattern == pattern]
    kept = [s for s in report.skipped if s.pattern == pattern]
    assert len(widened) + len(kept) == 1 and bool(widened) == decision.widen, report
    text = widened[0].summary if widened else kept[0].reason
    assert "predicted:" in text and "as 3 branches" in text, text
    assert f"in={tuple(x[0].shape)}" in decision.key


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_replayed_decisions_are_followed_without_timing(kind):
    model, pattern, op = _blocks(kind)
    x = _inputs()
    first = fxrep.fuse(model, example_inputs=x)
    (key,) = first.meta["fxrep_report"].decisions
    # 'apart' is the opposite of what a wide-favouring table says here: the replay must follow the record
    gm = assert_fused_equivalent(model, x, fused=fxrep.fuse(model, example_inputs=x, decisions={key: False}))
    report = gm.meta["fxrep_report"]
    assert report.after[op] == 3 and report.decisions[key].source == "replayed"
    (skip,) = [s for s in report.skipped if s.pattern == pattern]
    assert "widening would be slower at this shape" in skip.reason


def _never_timed(forms):
    raise AssertionError("a replayed decision must not be timed")


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_a_measured_decision_follows_the_timer_and_replays_to_the_same_graph(kind):
    model, pattern, op = _blocks(kind)
    x = _inputs()
    slower = cost.MeasuredCostModel(timer=lambda forms: {"apart": 1.0, "wide": 1.5})
    gm, report = _fuse_with(model, x, slower)
    (decision,) = report.decisions.values()
    assert not decision.widen and decision.source == "measured"
    assert graph_stats(gm)[op] == 3
    replay = cost.ReplayedCostModel(json.loads(json.dumps(report.decisions_as_dict())),
                                    cost.MeasuredCostModel(timer=_never_timed))
    again, _ = _fuse_with(model, x, replay)
    assert again.code == gm.code


def test_autotune_times_on_this_machine_and_its_record_reproduces_the_graph():
    model, _, _ = _blocks("mlp")
    x = _inputs()
    tuned = fxrep.fuse(model, example_inputs=x, autotune=True)
    report = tuned.meta["fxrep_report"]
    assert [d.source for d in report.decisions.values()] == ["measured"] and "autotune" in report.cost_model
    replayed = fxrep.fuse(model, example_inputs=x, decisions=report.decisions_as_dict())
    assert replayed.code == tuned.code
    assert all(torch.equal(a, b) for a, b in zip(replayed.state_dict().values(), tuned.state_dict().values()))


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_without_a_shape_widening_is_not_priced(kind):
    model, pattern, op = _blocks(kind)
    gm = fxrep.fuse(model)
    report = gm.meta["fxrep_report"]
    (applied,) = [a for a in report.applied if a.pattern == pattern]
    assert report.after[op] == 1 and "not priced: no input shape known" in applied.summary
    assert not report.decisions
    assert_fused_equivalent(model, _inputs(), fused=gm)


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_groups_under_the_floor_widen_unpriced(kind):
    model = (GeneratedMlpBlock(MlpSpec(dim=16, hidden=32, branches=3, lam=None, seed=1)) if kind == "mlp" else
             GeneratedAttentionBlock(AttentionSpec(dim=16, heads=2, branches=3, lam=None, seed=1)))
    gm = assert_fused_equivalent(model, make_inputs(16, torch.float32))
    report = gm.meta["fxrep_report"]
    (applied,) = [a for a in report.applied if a.pattern.startswith("widen")]
    assert "not priced" in applied.summary and "multiply-adds" in applied.summary and not report.decisions


def test_a_model_on_another_device_is_not_priced_with_the_cpu_table():
    ctx = FuseContext(torch.fx.symbolic_trace(torch.nn.Linear(3, 3)), FuseOptions(torch.device("cuda")))
    assert "runs on cuda" in cost.unpriced(ctx, (2, 3))
    ctx = FuseContext(ctx.gm, FuseOptions(torch.device("cpu")))
    assert cost.unpriced(ctx, (2, 3)) is None and "no input shape" in cost.unpriced(ctx, None)


def test_groups_of_one_shape_are_decided_once():
    model = torch.nn.Sequential(*[GeneratedMlpBlock(MlpSpec(dim=DIM, hidden=512, branches=2, lam=None,
                                                            seed=i))
                                  for i in range(4)]).eval()
    calls = []

    def timer(forms):
        calls.append(1)
        return {"apart": 2.0, "wide": 1.0}
    gm, report = _fuse_with(model, _inputs(), cost.MeasuredCostModel(timer=timer))
    assert len(calls) == 1 and len(report.decisions) == 1  # four blocks of one shape


# -- the kernel table ---------------------------------------------------------------------------------------

def _synthetic_table():
    """Times that follow a known law (0.01 ms + work / 1e6), on a grid with a hole where the work is large."""
    def law(work):
        return 0.01 + work / 1e6
    grid = [1, 4, 16, 64]
    linear = [[m, k, n, law(m * k * n)] for m in grid for k in grid for n in grid if m * k * n <= 16 ** 3]
    attention = [[b, t, d, law(b * t * t * d)] for b in grid for t in grid for d in grid]
    elementwise = [[e, law(e)] for e in grid]
    return cost.KernelTable({"linear": linear, "attention": attention, "activation": elementwise,
                             "add": elementwise})


@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 200), k=st.integers(1, 200), n=st.integers(1, 200))
def test_table_prices_are_bracketed_by_the_grid_and_grow_with_the_work(m, k, n):
    table = _synthetic_table()
    t = table.time_ms(cost.Linear(m, k, n))
    assert t > 0 and t == table.time_ms(cost.Linear(m, k, n))  # a pure function of the shape
    # log-linear interpolation of a monotone law stays monotone: more work never costs less
    assert table.time_ms(cost.Linear(m + 1, k, n)) >= t * (1 - 1e-12)
    assert table.time_ms(cost.Linear(m, k, n + 7)) >= t * (1 - 1e-12)
    if max(m, k, n) <= 64 and m * k * n <= 16 ** 3:  # inside the measured grid: within the law's range
        law = [0.01 + w / 1e6 for w in (1, 16 ** 3)]
        assert law[0] * (1 - 1e-12) <= t <= law[1] * (1 + 1e-12)


def test_table_is_exact_at_grid_points_and_scales_by_work_beyond():
    table = _synthetic_table()
    assert table.time_ms(cost.Linear(4, 16, 64)) == pytest.approx(0.01 + 4 * 16 * 64 / 1e6, rel=1e-12)
    assert table.time_ms(cost.Attention(4, 16, 16, 16)) == pytest.approx(0.01 + 4 * 16 * 16 * 16 / 1e6,
                                                                         rel=1e-12)
    edge = table.time_ms(cost.Elementwise("add", 64))
    assert table.time_ms(cost.Elementwise("add", 256)) == pytest.approx(4 * edge, rel=1e-12)
    assert table.time_ms(cost.Elementwise("add", 1)) == table.time_ms(cost.Elementwise("add", 0))


def test_the_shipped_table_covers_what_it_prices():
    table = cost.load_table()
    assert table.meta["threads"] >= 1 and table.meta["dtype"] == "float32"
    group = cost.mlp_group((1, 197, 384), [1536, 1536], 384, ("gelu", torch.nn.functional.gelu),
                           torch.float32)
    decision = cost.TableCostModel().price(group)
    assert decision.apart_ms > 0 and decision.wide_ms > 0 and decision.source == "table"


# -- the same call gives the same graph, whatever the machine is doing
# ----------------------------------------

_FUSE_IN_A_PROCESS = textwrap.dedent("""
    import sys, timm, torch, fxrep
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_18x2_224", depth=2, img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    gm = fxrep.fuse(model, example_inputs=(x,))
    torch.save({"code": gm.code, "state": gm.state_dict(),
                "decisions": gm.meta["fxrep_report"].decisions_as_dict()}, sys.argv[1])
""")


def test_fuse_is_deterministic_beside_a_cpu_bound_job(tmp_path):
    """Two processes fuse timm's parallel ViT at 64 px (whose MLP groups measured within a few percent of
    even), one of them beside a busy loop: same code, same decisions, every tensor the same bits (one
    machine)."""
    # other hash seeds too: nothing may depend on the iteration order of a set of strings
    quiet = subprocess.run([sys.executable, "-c", _FUSE_IN_A_PROCESS, str(tmp_path / "a.pt")],
                           env=dict(os.environ, PYTHONHASHSEED="1"), capture_output=True, text=True,
                           timeout=600)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    busy_loop = subprocess.Popen([sys.executable, "-c", "while True: sum(i * i for i in range(10000))"])
    try:
        loaded = subprocess.run([sys.executable, "-c", _FUSE_IN_A_PROCESS, str(tmp_path / "b.pt")],
                                env=dict(os.environ, PYTHONHASHSEED="2"), capture_output=True, text=True,
                                timeout=600)
    finally:
        busy_loop.kill()
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert a["code"] == b["code"] and a["decisions"] == b["decisions"] and a["decisions"]
    assert a["state"].keys() == b["state"].keys()
    assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
