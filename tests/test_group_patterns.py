"""The group protocol (``fxrep.pattern.GroupPattern``): a pattern declares a key per node and one rewrite per
group; the engine groups, and leaves out of a group every node that reads another of its nodes. A user's
group pattern that batches ReLUs (one ``relu`` over the inputs stacked, then split) must stay exact on
generated graphs where some ReLUs read others, and each such ReLU is reported as left out."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxrep
from fxrep.testing import assert_fused_equivalent


class BatchReLUs:
    """``relu(a), relu(b), ...`` of one shape -> ``relu(stack([a, b, ...]))`` read row by row."""

    name, phase = "batch_relus", "fuse"

    def group_key(self, node, ctx):
        shape = node.meta.get("tensor_meta")
        return ("relu", tuple(shape.shape)) if node.target is torch.relu and shape is not None else None

    def match_group(self, nodes, ctx):
        if len(nodes) < 2:
            return None
        order = {n: i for i, n in enumerate(ctx.graph.nodes)}
        if any(order[n.args[0]] > order[nodes[0]] for n in nodes):  # the batch is built before the first
            return fxrep.Skip(nodes, "an input is computed after the first ReLU")
        return fxrep.Match(nodes, None, f"{len(nodes)} ReLUs in one")

    def replace(self, match, ctx):
        graph = ctx.graph
        with graph.inserting_before(match.nodes[0]):
            inputs = [ctx.resolve(n.args[0]) for n in match.nodes]
            batched = graph.call_function(torch.relu, (graph.call_function(torch.stack, (inputs,)),))
            for i, node in enumerate(match.nodes):
                ctx.replace_node(node, graph.call_function(torch.select, (batched, 0, i)))


class ReLUGraph(nn.Module):
    """ReLUs of ``x`` scaled by 1, 2, ... (computed first), and ReLUs that read an earlier ReLU (``chain``:
    for each ReLU, the index of the ReLU it reads plus one, or None)."""

    def __init__(self, chain):
        super().__init__()
        self.chain = chain

    def forward(self, x):
        scaled = [x * (i + 1) for i in range(len(self.chain))]
        outs: list = []
        for i, parent in enumerate(self.chain):
            outs.append(torch.relu(scaled[i] if parent is None else outs[parent] - 0.5))
        return sum(outs)


@st.composite
def chains(draw):
    n = draw(st.integers(2, 6))
    return [None] + [draw(st.one_of(st.none(), st.integers(0, i - 1))) for i in range(1, n)]


@settings(max_examples=25, deadline=None)
@given(chain=chains(), seed=st.integers(0, 1000))
def test_a_group_pattern_merges_independent_nodes_only(chain, seed):
    torch.manual_seed(seed)
    model, x = ReLUGraph(chain).eval(), torch.randn(3, 5)
    registry = fxrep.PatternRegistry([BatchReLUs()])
    gm = assert_fused_equivalent(model, (x,), patterns=registry)
    independent = sum(parent is None for parent in chain)  # ReLUs of x alone: they always merge
    relus = [n for n in gm.graph.nodes if n.target is torch.relu]
    assert (len(relus) < len(chain)) == (independent > 1), (chain, gm.code)


def test_a_node_that_reads_another_of_its_group_is_left_out_with_the_reason():
    model, x = ReLUGraph([None, None, 0]).eval(), torch.randn(3, 5)
    ctx = fxrep.FuseContext(fxrep.trace(model))
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(ctx.gm).propagate(x)
    from fxrep.engine import _group_results

    results = _group_results(BatchReLUs(), ctx)
    relus = [n for n in ctx.graph.nodes if n.target is torch.relu]
    assert [type(r).__name__ for r in results] == ["Match", "Skip"]
    assert list(results[0].nodes) == relus[:2] and list(results[1].nodes) == relus[2:]
    assert "reads the output of another node of its group" in results[1].reason


def test_the_engine_reports_near_misses_in_graph_order():
    class Near(BatchReLUs):
        def near_misses(self, ctx):
            return [fxrep.Skip([n], "a near miss") for n in ctx.graph.nodes if n.target is torch.relu][:1]

    model, x = ReLUGraph([None, None]).eval(), torch.randn(2, 3)
    gm = fxrep.fuse(model, example_inputs=(x,), patterns=fxrep.PatternRegistry([Near()]))
    assert any(s.reason == "a near miss" for s in gm.meta["fxrep_report"].skipped)


def test_a_pattern_without_match_or_group_key_is_refused():
    class Neither:
        name, phase = "neither", "fuse"

        def replace(self, match, ctx):
            return None

    with pytest.raises(fxrep.PatternError, match="group_key"):
        fxrep.PatternRegistry([Neither()])
