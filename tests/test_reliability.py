"""Never break a model: layout-dependent readers, in-place ops, guards, fixed points, and the self-check."""

import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import fx

import fxrep
from fxrep.engine import _redirect_stale_reads
from fxrep.ir import as_linear, emit_linear, fetch_attr, fingerprint
from fxrep.testing import assert_fused_equivalent, compare_outputs, fuzz_check, random_graphs


class WindowShuffle(nn.Module):
    """Swin's window partition / ShuffleNet's channel shuffle: permute -> contiguous -> view."""

    def __init__(self, d, perm, then):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.perm, self.then = perm, then

    def forward(self, x):  # x: (b, n, d)
        h = self.lin(x).unflatten(-1, (2, -1)).permute(*self.perm).contiguous()
        if self.then == "view":
            return h.view(h.shape[0], -1)
        if self.then == "as_strided":
            return h.as_strided((h.numel(),), (1,))
        if self.then == "inplace":
            h.mul_(2.0)
            return self.lin(x) + h.sum()
        if self.then == "output":
            return h
        return self.lin(h.flatten(-2, -1).transpose(-1, -2).transpose(-1, -2)[..., : self.lin.in_features])


@given(d=st.sampled_from([2, 4, 6, 8]), n=st.integers(1, 4), perm=st.permutations([0, 1, 2, 3]),
       then=st.sampled_from(["view", "as_strided", "inplace", "output"]))
def test_contiguous_before_a_layout_reader_is_kept(d, n, perm, then):
    model = WindowShuffle(d, perm, then).eval()
    x = torch.randn(2, n, d)
    fused = assert_fused_equivalent(model, (x,))
    assert any(node.target == "contiguous" for node in fused.graph.nodes)
    out, want = fused(x), model(x)
    assert out.is_contiguous() == want.is_contiguous()


def test_contiguous_before_a_linear_is_dropped():
    model = WindowShuffle(4, (0, 1, 2, 3), "linear").eval()
    fused = assert_fused_equivalent(model, (torch.randn(2, 3, 4),))
    assert not any(node.target == "contiguous" for node in fused.graph.nodes)


class InplaceAct(nn.Module):
    def __init__(self, d, act, reread):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, d)
        self.act, self.reread = act, reread

    def forward(self, x):
        h = self.fc1(x)
        y = self.act(h)
        return self.fc2(y) + (h if self.reread else 0.0)


INPLACE_ACTS = {"relu": lambda: nn.ReLU(inplace=True), "silu": lambda: nn.SiLU(inplace=True),
                "hardswish": lambda: nn.Hardswish(inplace=True),
                "leaky": lambda: nn.LeakyReLU(0.1, inplace=True)}


@given(act=st.sampled_from(sorted(INPLACE_ACTS)), reread=st.booleans(), d=st.integers(1, 8))
def test_inplace_activation_modules_are_exact(act, reread, d):
    model = InplaceAct(d, INPLACE_ACTS[act](), reread).eval()
    fused = assert_fused_equivalent(model, (torch.randn(3, d),))
    functional = not any(n.op == "call_module" for n in fused.graph.nodes)
    assert functional == (not reread)  # the write is invisible only where nothing else reads h


class InplaceOps(nn.Module):
    """In-place writes that fxrep must never merge, fold, CSE or move."""

    def __init__(self, d):
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        h1, h2 = self.a(x), self.a(x)
        h1 += self.b(x)
        h2.add_(1.0)
        g = F.relu(h1, inplace=True)
        return h1 + h2 + g + F.gelu(self.b(x))


def test_inplace_ops_are_left_alone():
    assert_fused_equivalent(InplaceOps(4).eval(), (torch.randn(2, 4),))


class RepeatedChecks(nn.Module):
    """coat's blocks call ``torch._assert`` with the same condition more than once: CSE 'merged' the copies,
    which had no users and were never removed, so the canonicalize phase never reached a fixed point."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        for _ in range(3):
            torch._assert(x.shape[-1] == 4, "")
            x = self.lin(x)
        return x


def test_repeated_asserts_reach_a_fixed_point_and_are_kept():
    model = RepeatedChecks().eval()
    fused = assert_fused_equivalent(model, (torch.randn(2, 4),))
    assert sum(1 for n in fused.graph.nodes if n.target is torch._assert) == 3


@given(random_graphs(max_steps=8))
def test_no_two_builtin_patterns_undo_each_other(case):
    """Every phase reaches its fixed point (else InternalError), and a fused graph is a fixed point of the
    whole pipeline: fusing it again gives the same code (attention is lifted and lowered back as it was)."""
    result = fuzz_check(case)
    if result["error"] is not None:
        return
    fused = fxrep.fuse(case.model, example_inputs=case.inputs)
    again = fxrep.fuse(fused, example_inputs=case.inputs)
    assert _structure(again) == _structure(fused)
    assert {a.pattern for a in again.meta["fxrep_report"].applied} <= {"lift_attention", "lower_attention"}


def _structure(gm) -> list:
    """A graph up to node names: ops, targets (constants by their bits) and arguments as node positions."""
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    out = []
    for n in gm.graph.nodes:
        target = fingerprint(fetch_attr(gm, n.target)) if n.op == "get_attr" else \
            str(n.target) if n.op != "call_module" else type(fetch_attr(gm, n.target)).__name__
        out.append((n.op, target, str(fx.node.map_arg((n.args, n.kwargs), lambda a: index[a]))))
    return out


class NeverDone:
    """A broken pattern: matches every Linear and 'rewrites' it into itself forever."""

    name, phase = "never_done", "fuse"

    def match(self, node, ctx):
        return fxrep.Match([node], None, "rewrites nothing") if as_linear(node) is not None else None

    def replace(self, match, ctx):
        return None


def test_a_pattern_that_never_finishes_is_named():
    registry = fxrep.default_registry()
    registry.register(NeverDone())
    with pytest.raises(fxrep.InternalError, match=r"fixed point.*'never_done'.*without\('never_done'\)"):
        fxrep.fuse(nn.Sequential(nn.Linear(2, 2)).eval(), patterns=registry)


class WrongShape:
    """A broken pattern: replaces a Linear by one with the wrong output width."""

    name, phase = "wrong_shape", "lower"

    def match(self, node, ctx):
        lin = as_linear(node)
        if lin is None or lin.weight.shape[0] != 3:
            return None
        return fxrep.Match([node], lin, "drops an output feature")

    def replace(self, match, ctx):
        lin = match.data
        with ctx.graph.inserting_before(lin.node):
            new = emit_linear(ctx.graph, lin.input, lin.weight[:2], None, lin.weight.dtype, "broken")
        ctx.replace_node(lin.node, new)


def test_a_graph_that_does_not_run_is_never_returned_and_the_advice_works():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    x = torch.randn(5, 4)
    registry = fxrep.default_registry().with_pattern(WrongShape())
    with pytest.raises(fxrep.InternalError, match=r"raises RuntimeError.*'wrong_shape'.*drops an output"):
        fxrep.fuse(model, patterns=registry, example_inputs=(x,))
    fused = fxrep.fuse(model, patterns=registry.without("wrong_shape"), example_inputs=(x,))
    compare_outputs(model(x), fused(x))


def test_a_dead_inplace_write_into_a_fresh_value_is_removed():
    """Found by test_no_two_builtin_patterns_undo_each_other once nn.MultiheadAttention joined the fuzz ops:
    ``h = linear(x); act_(h) + h`` whose sum is dead kept the in-place activation (and its Linear) forever, so
    a second fuse removed them and the first was not a fixed point. A write into a value that owns its memory
    and has no other reader is dead code."""
    from fxrep.testing import GraphSpec, RandomGraphModel, make_inputs

    spec = GraphSpec(dim=2, steps=[("inplace_act", (0, 0), 1), ("mha", (0, 0), 0)])
    x = make_inputs(2, torch.float32, tokens=3)
    fused = assert_fused_equivalent(RandomGraphModel(spec), x)
    assert not any(n.op == "call_module" for n in fused.graph.nodes)
    assert _structure(fxrep.fuse(fused, example_inputs=x)) == _structure(fused)


class DoubleToAdd:
    """A user pattern that builds on what its match saw without ``ctx.resolve``: ``x * 2`` -> ``x + x``.
    In ``(x * 2) * 2`` the outer rewrite reads the inner product, which the inner rewrite replaced."""

    name, phase = "double_to_add", "canonicalize"

    def __init__(self, place_after_readers: bool = False):
        self.place_after_readers = place_after_readers

    def match(self, node, ctx):
        if node.op == "call_function" and node.target is operator.mul and node.args[1:] == (2,):
            return fxrep.Match([node], node.args[0], "x * 2 -> x + x")
        return None

    def replace(self, match, ctx):
        node, x = match.nodes[0], match.data
        where = next(iter(ctx.graph.find_nodes(op="output"))) if self.place_after_readers else node
        with ctx.graph.inserting_before(where):
            ctx.replace_node(node, ctx.graph.call_function(operator.add, (x, x)))


class Doubles(nn.Module):
    def forward(self, x):
        return torch.relu((x * 2) * 2) - x


def test_a_rewrite_that_reads_a_value_its_pattern_replaced_reads_the_replacement():
    registry = fxrep.PatternRegistry([DoubleToAdd()])
    x = torch.randn(3, 4)
    fused = fxrep.fuse(Doubles().eval(), patterns=registry, example_inputs=(x,), check=True)
    assert [n.target for n in fused.graph.nodes if n.op == "call_function"].count(operator.add) == 2
    assert not any(n.target is operator.mul for n in fused.graph.nodes)
    torch.testing.assert_close(fused(x), Doubles()(x), rtol=0, atol=0)  # x*2 and x+x are both exact


def test_a_pattern_that_breaks_the_order_of_the_graph_is_named():
    registry = fxrep.PatternRegistry([DoubleToAdd(place_after_readers=True)])
    message = r"malformed after the 'canonicalize' phase.*: double_to_add"
    with pytest.raises(fxrep.InternalError, match=message):
        fxrep.fuse(Doubles().eval(), patterns=registry)


def test_a_stale_read_that_cannot_be_repaired_names_the_pattern():
    """The repair reads the replacement only where it comes before the reader; otherwise fxrep says which
    pattern to fix (``ctx.resolve``)."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    old = graph.call_function(torch.neg, (x,))
    reader = graph.call_function(torch.relu, (old,))
    new = graph.call_function(torch.neg, (x,))  # after the reader
    graph.output(reader)
    with pytest.raises(fxrep.InternalError, match=r"'double_to_add' read neg, .*ctx.resolve"):
        _redirect_stale_reads(graph, {old: new}, DoubleToAdd())
    graph.erase_node(new)
    with pytest.raises(fxrep.InternalError, match=r"'double_to_add' read neg"):
        _redirect_stale_reads(graph, {old: new}, DoubleToAdd())
