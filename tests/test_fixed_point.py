"""Every phase reaches its fixed point, and when one does not, the error says what still changes and gives
only advice that works: each piece of advice is followed here, literally, on a branched model that must
still merge."""

import operator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

import fxrep
from fxrep.patterns import EliminateCommonSubexpressions
from fxrep.testing import GeneratedMlpBlock, MlpSpec, assert_fused_equivalent, make_inputs

# -- common subexpressions collapse in one sweep -------------------------------------------------------------

CHAIN_OPS = {
    "add": lambda g, n, c: g.call_function(operator.add, (n, c)),
    "mul": lambda g, n, c: g.call_function(operator.mul, (n, c)),
    "neg": lambda g, n, c: g.call_function(torch.neg, (n,)),
    "tanh": lambda g, n, c: g.call_method("tanh", (n,)),
    "gelu": lambda g, n, c: g.call_function(F.gelu, (n,)),
}


def _twin_chains(ops: list, consts: list) -> fx.GraphModule:
    """Two identical chains of ``ops`` from one input, their ends summed: every node of the second chain is
    a duplicate of the first's, at depth up to len(ops)."""
    g = fx.Graph()
    x = g.placeholder("x")
    ends = []
    for _ in range(2):
        n = x
        for op, c in zip(ops, consts):
            n = CHAIN_OPS[op](g, n, c)
        ends.append(n)
    g.output(g.call_function(operator.add, tuple(ends)))
    return fx.GraphModule(nn.Module(), g)


@settings(max_examples=20, deadline=None)
@given(data=st.data(), depth=st.integers(1, 200))
def test_a_chain_of_duplicates_of_any_depth_collapses_in_one_sweep(data, depth):
    ops = data.draw(st.lists(st.sampled_from(sorted(CHAIN_OPS)), min_size=depth, max_size=depth))
    consts = data.draw(st.lists(st.sampled_from([0.5, 1.0, -2.0, 0.25]), min_size=depth, max_size=depth))
    gm = _twin_chains(ops, consts)
    x = torch.randn(3, 4, dtype=torch.float64)
    fused = fxrep.fuse(gm, patterns=[EliminateCommonSubexpressions()], example_inputs=(x,))
    report = fused.meta["fxrep_report"]
    # canonicalize: one sweep merges every duplicate, one finds none left; fuse and lower: one each, none left
    assert report.sweeps == 4
    assert report.count("eliminate_common_subexpressions") == depth
    calls = [n for n in fused.graph.nodes if n.op in ("call_function", "call_method")]
    assert len(calls) == depth + 1
    torch.testing.assert_close(fused(x), gm(x), rtol=0, atol=0)  # the same ops on the same values


def test_hugging_face_beit_in_core_aten_reaches_its_fixed_point():
    """BEiT's relative position bias decomposes into long chains of duplicate index arithmetic: CSE used to
    collapse them one level per sweep and ran out of sweeps."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BeitConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, image_size=32, patch_size=8,
                                     use_relative_position_bias=True)
    torch.manual_seed(0)
    model = transformers.BeitModel(config).eval()
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(model, (x,)).run_decompositions()
    fused = fxrep.fuse(program, check=True)
    report = fused.graph_module.meta["fxrep_report"]
    assert report.sweeps <= 12 and report.count("eliminate_common_subexpressions") > 0


# -- when a phase does not converge, the advice works
# ---------------------------------------------------------

def marker(x):
    return x


def other_marker(x):
    return x


fx.wrap("marker")
fx.wrap("other_marker")


class MarkedBlock(nn.Module):
    """``marks`` leaf calls of ``marker`` before a branched MLP block (2 joined branches)."""

    def __init__(self, marks: int):
        super().__init__()
        self.marks = marks
        self.block = GeneratedMlpBlock(MlpSpec(dim=8, hidden=16, branches=2, lam=1.0, seed=3))

    def forward(self, x):
        for _ in range(self.marks):
            x = marker(x)
        return self.block(x)


def _first_marker(ctx):
    return next((n for n in ctx.graph.nodes if n.target is marker), None)


class DropOneMarkerPerSweep:
    """A slow but correct user pattern: removes the first ``marker`` call of the graph, one per sweep."""

    name, phase = "drop_one_marker", "canonicalize"

    def match(self, node, ctx):
        first = ctx.analysis(_first_marker)
        return fxrep.Match([node], None, "one marker dropped") if node is first else None

    def replace(self, match, ctx):
        ctx.replace_node(match.nodes[0], match.nodes[0].args[0])


class Swap:
    """With its twin, a broken pair of user patterns: one rewrites ``source`` into ``target``, the other
    back."""

    phase = "canonicalize"

    def __init__(self, name, source, target):
        self.name, self.source, self.target = name, source, target

    def match(self, node, ctx):
        return fxrep.Match([node], None, f"{self.source.__name__} -> {self.target.__name__}") \
            if node.op == "call_function" and node.target is self.source else None

    def replace(self, match, ctx):
        node = match.nodes[0]
        with ctx.graph.inserting_before(node):
            new = ctx.graph.call_function(self.target, node.args)
        ctx.replace_node(node, new)


def _merged(fused) -> bool:
    report = fused.meta["fxrep_report"]
    return report.after["activation"] == 1 and report.before["activation"] == 2


def test_a_phase_that_needs_more_sweeps_says_so_and_more_sweeps_work():
    model = MarkedBlock(70).eval()
    x = make_inputs(8, torch.float32)
    registry = fxrep.default_registry()
    registry.register(DropOneMarkerPerSweep(), before="drop_identity")
    with pytest.raises(fxrep.InternalError) as failure:
        fxrep.fuse(model, patterns=registry, example_inputs=x)
    message = str(failure.value)
    assert "'drop_one_marker'" in message and "still changing" in message and "max_sweeps=200" in message
    assert "without('drop_one_marker')" in message
    fused = assert_fused_equivalent(model, x, fused=fxrep.fuse(model, patterns=registry, example_inputs=x,
                                                               max_sweeps=200))
    assert _merged(fused) and not any(n.target is marker for n in fused.graph.nodes)
    without = fxrep.fuse(model, patterns=registry.without("drop_one_marker"), example_inputs=x)
    assert _merged(assert_fused_equivalent(model, x, fused=without))


def test_patterns_that_undo_each_other_are_named_and_removing_yours_works():
    model = MarkedBlock(3).eval()
    x = make_inputs(8, torch.float32)
    registry = fxrep.default_registry()
    registry.register(Swap("to_other", marker, other_marker))
    registry.register(Swap("back", other_marker, marker))
    with pytest.raises(fxrep.InternalError) as failure:
        fxrep.fuse(model, patterns=registry, example_inputs=x)
    message = str(failure.value)
    assert "'to_other'" in message and "'back'" in message and "ends with the graph as it began" in message
    assert "max_sweeps" not in message  # more sweeps would not help
    advice = "without('to_other', 'back')"
    assert advice in message
    fused = fxrep.fuse(model, patterns=registry.without("to_other", "back"), example_inputs=x)
    assert _merged(assert_fused_equivalent(model, x, fused=fused))


def test_a_builtin_that_never_finishes_is_reported_as_fxreps_bug():
    class Broken:
        name, phase = "drop_identity", "canonicalize"  # stands in for a broken built-in

        def match(self, node, ctx):
            return fxrep.Match([node], None, "rewrites nothing") if node.op == "placeholder" else None

        def replace(self, match, ctx):
            return None

    registry = fxrep.default_registry().without("drop_identity")
    registry.register(Broken(), before="functionalize_modules")
    with pytest.raises(fxrep.InternalError, match=r"bug in fxrep; please report it") as failure:
        fxrep.fuse(MarkedBlock(0).eval(), patterns=registry)
    assert "without(" not in str(failure.value)
