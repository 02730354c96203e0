"""Tracing never fixes an argument the caller can pass without a guard, and leaves no trace on the model."""

import io

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st
from torch import fx

import fxrep
from fxrep.snapshot import ModelSnapshot
from fxrep.testing import assert_fused_equivalent, compare_outputs


class OptionalInput(nn.Module):
    """A model whose only input defaults to None."""

    def __init__(self, d=4):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x=None):
        if x is None:
            x = torch.zeros(1, self.lin.in_features)
        return self.lin(x)


class OptionalSecond(nn.Module):
    def __init__(self, d=4):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x, y=None):
        h = self.lin(x)
        return h if y is None else h + y


class Flagged(nn.Module):
    def __init__(self, d=4):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x, double: bool = False):
        h = self.lin(x)
        return h * 2 if double else h


@given(d=st.integers(1, 8), batch=st.integers(1, 4), seed=st.integers(0, 100))
def test_a_first_argument_defaulting_to_none_stays_an_input(d, batch, seed):
    torch.manual_seed(seed)
    model = OptionalInput(d).eval()
    fused = fxrep.fuse(model)
    assert [n.op for n in fused.graph.nodes].count("placeholder") == 1
    for _ in range(2):  # not a constant: every input gives its own output
        x = torch.randn(batch, d)
        compare_outputs(model(x), fused(x))
    assert fused.meta["fxrep_report"].specialized == {}


def test_a_positional_argument_defaulting_to_none_is_guarded_and_the_advice_works():
    model = OptionalSecond().eval()
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    fused = fxrep.fuse(model)
    assert fused.meta["fxrep_report"].specialized == {"y": None}
    assert "y=None" in str(fused.meta["fxrep_report"])
    compare_outputs(model(x), fused(x))
    with pytest.raises(fxrep.InputError, match=r"'y' fixed to None.*concrete_args=\{\}"):
        fused(x, y)
    kept = fxrep.fuse(model, concrete_args={})  # the advice, literally
    compare_outputs(model(x, y), kept(x, y))
    supplied = fxrep.fuse(model, example_inputs=(x, y), check=True)  # the other advice
    compare_outputs(model(x, y), supplied(x, y))


def test_a_bool_flag_is_fixed_to_the_value_given_and_guarded():
    model = Flagged().eval()
    x = torch.randn(2, 4)
    fused = fxrep.fuse(model)
    compare_outputs(model(x), fused(x))
    compare_outputs(model(x, False), fused(x, False))
    with pytest.raises(fxrep.InputError, match="'double' fixed to False"):
        fused(x, True)
    doubled = fxrep.fuse(model, example_inputs=(x, True), check=True)
    compare_outputs(model(x, True), doubled(x, True))
    with pytest.raises(fxrep.InputError, match="'double' fixed to True"):
        doubled(x, False)


def test_guards_survive_save_load_and_do_not_break_later_traces():
    fused = fxrep.fuse(OptionalSecond().eval())
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with pytest.raises(fxrep.InputError):
        loaded(torch.randn(1, 4), torch.randn(1, 4))
    fx.symbolic_trace(OptionalSecond())  # fx's own _assert_is_none in a loaded GraphModule breaks this
    fx.symbolic_trace(OptionalSecond(), concrete_args={"y": None})


def test_user_traced_guards_are_kept_through_fuse():
    model = OptionalSecond().eval()
    traced = fx.symbolic_trace(model, concrete_args={"y": None})
    fused = fxrep.fuse(traced)
    x = torch.randn(2, 4)
    compare_outputs(model(x), fused(x))
    with pytest.raises(fxrep.InputError, match="specialized"):
        fused(x, torch.randn(2, 4))


class Cached(nn.Module):
    """Writes to itself while it runs in eval mode, as timm's LeViT attention does."""

    def __init__(self, d=4):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.bias = nn.Parameter(torch.randn(d))
        self.cache: dict = {}
        self.calls: list = []

    def forward(self, x):
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.bias * 2
        self.calls.append(1)
        self.last = key
        return self.lin(x) + self.cache[key]


def test_tracing_restores_caches_lists_and_attributes():
    model = Cached().eval()
    x = torch.randn(2, 4)
    model(x)  # a real cache entry, as after a first eval call
    snapshot = ModelSnapshot(model)
    fxrep.fuse(model, example_inputs=(x,))  # check=True would run the model, whose forward appends to calls
    assert snapshot.diff(model) == ""
    assert list(model.cache) == ["cpu"] and len(model.calls) == 1
    assert_fused_equivalent(model, (x,))


def test_a_model_polluted_by_an_earlier_fx_trace_still_fuses_and_stays_as_it_was():
    model = Cached().eval()
    x = torch.randn(2, 4)
    fx.symbolic_trace(model)  # plain fx leaves a Proxy in model.cache
    polluted = ModelSnapshot(model)
    fused = fxrep.fuse(model, example_inputs=(x,))
    assert polluted.diff(model) == ""
    model.cache.clear()
    compare_outputs(model(x), fused(x))


def test_a_malformed_graph_module_gets_a_clear_error():
    model = Cached().eval()
    fx.symbolic_trace(model)  # fine, but it leaves a Proxy in model.cache
    g2 = fx.symbolic_trace(model)  # reads that Proxy: a node of the first graph
    with pytest.raises(fxrep.InputError, match="malformed.*nn.Module itself"):
        fxrep.fuse(g2)


def test_snapshot_sees_every_kind_of_change():
    def changed(edit) -> str:
        model = Cached().eval()
        model(torch.randn(1, 4))
        snap = ModelSnapshot(model)
        edit(model)
        return snap.diff(model)

    assert changed(lambda m: None) == ""
    assert "cache" in changed(lambda m: m.cache.__setitem__("meta", 1))
    assert "calls" in changed(lambda m: m.calls.append(2))
    assert "last" in changed(lambda m: setattr(m, "last", "cuda"))
    assert "new attribute 'extra'" in changed(lambda m: setattr(m, "extra", 1))
    assert "_parameters" in changed(lambda m: m.bias.data.add_(1))
    assert "cache" in changed(lambda m: m.cache["cpu"].data.mul_(2))
    assert "_buffers" in changed(lambda m: m.register_buffer("b", torch.ones(1)))
