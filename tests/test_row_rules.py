"""Every row rule moves a row selection exactly, on both graph levels: torch-level graphs (fxrep.row_rules,
the rules fxrep.fuse prunes with) and ATen programs (fxrep.export.rows.rules). Each case is one op, spelled
as users write it, with a selection of its rows after it; hypothesis draws the shapes and the selection. The
pruned graph must have moved the selection above the op and compute the same outputs. A rows name that an op
spec declares and no case here covers fails ``test_every_row_rule_has_a_case``."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_rows import TOLERANCE

from fxrep import row_rules
from fxrep.equivalence import relative_error
from fxrep.export import rows as aten_rows
from fxrep.export.rows import rules as aten_rules
from fxrep.ir.known_ops import OPS
from fxrep.row_pruning import move_row_selections_up

# case -> (the op on ``x`` of shape ``m.shape`` = (b, n, c), c even, with ``m.pick`` selecting rows of its
# output axis 1 (or the axis it names); the levels where the rule can be seen: export leaves out eval dropout,
# and cat has no torch-level spelling fxrep reads). A case is named by its rows name, and "rows/..." where the
# axis moves through the op another way.
BOTH = ("torch", "aten")
CASES = {
    "elementwise": (lambda m, x: m.pick(torch.tanh(x) * 2 + x[:, :1]), BOTH),
    "linear": (lambda m, x: m.pick(F.linear(x, m.w, m.w[:, 0])), BOTH),
    "layer_norm": (lambda m, x: m.pick(F.layer_norm(x, (m.shape[2],), m.w[0], m.w[1])), BOTH),
    "softmax": (lambda m, x: m.pick(x.softmax(-1)), BOTH),
    "attention": (lambda m, x: _attention(m, x), BOTH),
    "matmul": (lambda m, x: m.pick(x @ m.w.t()), BOTH),
    "permute": (lambda m, x: m.pick(x.permute(0, 2, 1).permute(0, 2, 1)), BOTH),
    "transpose": (lambda m, x: m.pick(torch.transpose(x, 0, 2).transpose(2, 0)), BOTH),
    "view": (lambda m, x: m.pick(x.reshape(m.shape[0], m.shape[1], 2, -1)), BOTH),
    "unflatten": (lambda m, x: m.pick(x.unflatten(-1, (2, -1))), BOTH),
    "unflatten/after": (lambda m, x: m.pick(x.unflatten(0, (1, -1)), 2), BOTH),
    "flatten": (lambda m, x: m.pick(torch.flatten(x.unflatten(-1, (2, -1)), 2)), BOTH),
    "flatten/after": (lambda m, x: m.pick(torch.flatten(x.unflatten(0, (1, -1)), 0, 1)), BOTH),
    "unsqueeze": (lambda m, x: m.pick(x.unsqueeze(2)), BOTH),
    "unsqueeze/after": (lambda m, x: m.pick(x.unsqueeze(0), 2), BOTH),
    "narrow": (lambda m, x: m.pick(torch.narrow(x, 2, 1, m.shape[2] - 1)), BOTH),
    "reduction": (lambda m, x: m.pick(x.unflatten(-1, (2, -1)).sum(-1)), BOTH),
    "reduction/before": (lambda m, x: m.pick(x.unflatten(0, (1, -1)).mean(0)), BOTH),
    "reduction/keepdim": (lambda m, x: m.pick(x.unflatten(0, (1, -1)).sum(0, keepdim=True), 2), BOTH),
    "dropout": (lambda m, x: m.pick(F.dropout(x, 0.5, training=False)), ("torch",)),
    "cat": (lambda m, x: m.pick(torch.cat([x[:, :1] * 2, x], 1)), ("aten",)),
}


def _attention(m, x):
    """SDPA with the rows on the query axis: heads from the channels."""
    q = x.unflatten(-1, (2, -1)).transpose(1, 2)
    return m.pick(F.scaled_dot_product_attention(q, q * 2, q).transpose(1, 2))


class OneOp(torch.nn.Module):
    def __init__(self, name: str, shape: tuple, selection: tuple):
        super().__init__()
        self.op, self.shape, self.selection = CASES[name][0], shape, selection
        self.w = torch.nn.Parameter(torch.randn(3, shape[2]))

    def forward(self, x):
        return self.op(self, x)

    def pick(self, y, axis: int = 1):
        kind, a, b = self.selection
        lead = (slice(None),) * axis
        return y[(*lead, a)] if kind == "index" else y.select(axis, a) if kind == "select" else \
            y[(*lead, slice(a, b))]


@st.composite
def case(draw, name: str):
    """The op of ``CASES[name]`` on a drawn shape, with a drawn selection of some (never all) rows."""
    shape = (draw(st.integers(1, 3)), draw(st.integers(3, 7)), 2 * draw(st.integers(1, 4)))
    n = shape[1]
    kind, a = draw(st.sampled_from(("index", "select", "slice"))), draw(st.integers(0, n - 2))
    stop = draw(st.integers(a + 1, n - 1 if a == 0 else n)) if kind == "slice" else None
    torch.manual_seed(draw(st.integers(0, 2**16)))
    return OneOp(name, shape, (kind, a, stop)).eval(), torch.randn(shape)


def _names(level: str) -> list:
    return sorted(n for n, (_, levels) in CASES.items() if level in levels)


@pytest.mark.parametrize("name", _names("torch"))
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_torch_level_rules_move_the_selection_exactly(name, data):
    model, x = data.draw(case(name))
    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        expected = model(x)
        assert move_row_selections_up(gm, (x,)) >= 1, "the selection did not move"
        assert relative_error(expected, gm(x)) <= TOLERANCE


@pytest.mark.parametrize("name", _names("aten"))
@settings(max_examples=5, deadline=None)
@given(data=st.data())
def test_aten_rules_move_the_selection_exactly(name, data):
    model, x = data.draw(case(name))
    module = torch.export.export(model, (x,)).module()
    with torch.no_grad():
        expected = model(x)
        assert aten_rows.move_row_selections_up(module.graph), "the selection did not move"
        module.recompile()
        assert relative_error(expected, module(x)) <= TOLERANCE


TWO_SELECTIONS = [
    lambda x: x[:, :, 1:][:, 1:3],
    lambda x: x[:, 1:3][:, :, 1:],
    lambda x: torch.narrow(torch.narrow(x, 1, 1, 2), 2, 1, 3)[:, 0],
    lambda x: torch.narrow(torch.narrow(x, 2, 1, 3), 1, 1, 2)[:, :, 0],
    lambda x: torch.narrow(x, 2, 1, 3)[:, 1:3].relu(),
    lambda x: torch.narrow(x, 0, 0, 2)[:, 1:3].relu(),  # a slice that keeps every row: not a selection
]


@pytest.mark.parametrize("spelling", TWO_SELECTIONS)
def test_selections_of_two_axes_settle_in_either_order(spelling):
    """A slice is a selection and a row rule at once: two of them, of different axes, must not swap places
    forever (the engine's fixed point would raise)."""
    class M(torch.nn.Module):
        def forward(self, x):
            return spelling(x) * 2

    x = torch.randn(2, 5, 4)
    gm, module = torch.fx.symbolic_trace(M()), torch.export.export(M(), (x,)).module()
    move_row_selections_up(gm, (x,))  # raises InternalError where no fixed point is reached
    aten_rows.move_row_selections_up(module.graph)
    module.recompile()
    assert relative_error(M()(x), gm(x)) <= TOLERANCE
    assert relative_error(M()(x), module(x)) <= TOLERANCE


def test_every_row_rule_has_a_case():
    declared = {s.rows for s in OPS if s.rows}
    assert declared == {c.split("/")[0] for c in CASES}, "a rows name needs a case here (or a case is stale)"
    torch_level = {s.rows for s in OPS if s.rows and (s.functions or s.methods)}
    assert torch_level <= set(row_rules.RULES), "an op with a torch-level spelling names a rule it has not"
    assert {n.split("/")[0] for n, (_, levels) in CASES.items() if "torch" in levels} == set(row_rules.RULES)
    assert set(aten_rules._RULES_BY_NAME) == declared


@pytest.mark.parametrize("spelling", [
    lambda x: x.softmax(1)[:, 0],                      # softmax over the rows: mixes them
    lambda x: x.sum(1, keepdim=True)[:, 0],            # a reduction over the rows
    lambda x: (x @ x.transpose(1, 2))[:, :, 0],        # rows of the second operand of a product
    lambda x: torch.narrow(x, 1, 1, 2)[:, 0],          # a slice of the rows themselves
    lambda x: x.flatten(1)[:, 0],                      # the rows merged into one axis
    lambda x: F.dropout(x, 0.5, training=True)[:, 0],  # dropout that draws
])
def test_near_misses_keep_the_selection(spelling):
    class M(torch.nn.Module):
        def forward(self, x):
            return spelling(x)

    gm = torch.fx.symbolic_trace(M())
    assert move_row_selections_up(gm, (torch.randn(2, 5, 4),)) == 0
