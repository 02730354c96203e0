"""The op specs (fxrep/ir/known_ops.py) are the one place fxrep's knowledge of an op is written: every table
is derived from them, and each property a spec declares is checked here against torch itself, since the
passes trust it (a wrong ``elementwise`` would let row pruning cut rows of an op that mixes them)."""

import inspect

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx
from torch.fx.operator_schemas import get_signature_for_torch_op

from fxrep.export.rows.rules import ELEMENTWISE, RULES
from fxrep.frontend.spellings import TABLE
from fxrep.ir import targets
from fxrep.ir.known_ops import OPS
from fxrep.ir.opspec import IDENTITY, Attr, OpSpec, activation

aten = torch.ops.aten


def test_names_are_unique_and_every_spelling_belongs_to_one_op():
    names = [s.name for s in OPS]
    assert len(names) == len(set(names))
    for field in ("functions", "aten", "modules"):
        seen = [x for s in OPS for x in getattr(s, field)]
        assert len(seen) == len(set(seen)), f"a {field} entry is declared by two specs"


def test_the_derived_tables_are_exactly_what_the_specs_declare():
    assert set(TABLE) == {op for s in OPS for op, c in s.aten.items() if c is not None}
    assert set(RULES) == {op for s in OPS if s.rows for op in s.aten}
    assert ELEMENTWISE == {op for s in OPS if s.elementwise for op in s.aten}
    assert targets.ELEMENTWISE_METHODS == {m for s in OPS if s.elementwise for m in s.methods}
    assert targets.VIEW_FUNCTIONS == {f for s in OPS if s.view for f in s.functions}
    assert set(targets.ACTIVATION_FUNCTIONS) == {f for s in OPS if s.activation for f in s.functions}
    assert set(targets.MODULES) == {cls for s in OPS for cls in s.modules}


def test_an_activation_is_elementwise_by_definition():
    with pytest.raises(ValueError, match="elementwise"):
        OpSpec("f", (torch.sin,), activation=True)
    assert activation("softsign", (torch.nn.functional.softsign,)).rows == "elementwise"


# -- the properties, checked against torch ---------------------------------------------------------------

def _aten_arguments(op, shape, rng):
    """Arguments for an ATen overload from its schema: tensors of ``shape`` (a boolean one for a condition),
    the schema's defaults, and numbers where it has none."""
    sig = get_signature_for_torch_op(op)[0]
    args = []
    for name, p in sig.parameters.items():
        if p.kind is p.KEYWORD_ONLY:
            assert p.default is not inspect.Parameter.empty, (op, name)
            continue
        if "Tensor" in str(p.annotation) or p.annotation is torch.Tensor:
            t = torch.randn(shape, generator=rng, dtype=torch.float64)
            args.append(t > 0 if name == "condition" else t)
        elif p.default is not inspect.Parameter.empty:
            args.append(p.default)
        else:
            args.append(torch.float32 if "dtype" in name else 0.5)
    return args


ELEMENTWISE_ATEN = sorted((op for s in OPS if s.elementwise for op in s.aten), key=str)


@pytest.mark.parametrize("op", ELEMENTWISE_ATEN, ids=str)
@settings(max_examples=10, deadline=None)
@given(rows=st.integers(1, 5), cols=st.integers(1, 4), cut=st.data())
def test_an_overload_declared_elementwise_computes_rows_from_the_same_rows(op, rows, cols, cut):
    """``op(x)[a:b] == op(x[a:b])`` for every tensor operand: what row pruning relies on. The two calls may
    take the vectorized and the scalar path of one kernel, each within a few ulp of the exact value, so they
    agree to 8 ulp of float64 on values of order 1; an op that mixed rows would be off by order 1."""
    a = cut.draw(st.integers(0, rows - 1))
    b = cut.draw(st.integers(a + 1, rows))
    args = _aten_arguments(op, (rows, cols), torch.Generator().manual_seed(rows * 7 + cols))
    whole = op(*args)
    part = op(*[x[a:b] if isinstance(x, torch.Tensor) else x for x in args])
    ulp = torch.finfo(torch.float64).eps
    torch.testing.assert_close(part, whole[a:b], rtol=8 * ulp, atol=8 * ulp, equal_nan=True)  # sqrt(-1)


def _module_instances():
    explicit = {nn.Linear: nn.Linear(5, 3), nn.LayerNorm: nn.LayerNorm(5), nn.Softmax: nn.Softmax(dim=-1)}
    for cls, (spec, convert) in targets.MODULES.items():
        yield pytest.param(spec, cls, explicit.get(cls) or cls(), convert, id=cls.__name__)


@pytest.mark.parametrize("spec, cls, module, convert", list(_module_instances()))
def test_a_module_computes_the_call_its_spec_says_it_stands_for(spec, cls, module, convert):
    module.eval()
    x = torch.randn(4, 5, dtype=torch.float64)
    module.double()
    if convert is IDENTITY:
        assert torch.equal(module(x), x)
        return
    call = convert(module)
    args, kwargs = fx.node.map_aggregate(
        (call.args, call.kwargs), lambda a: getattr(module, a.name) if isinstance(a, Attr) else a)
    torch.testing.assert_close(call.target(x, *args, **kwargs), module(x), rtol=0, atol=0)
    if spec.activation:
        assert call.target is spec.functions[0]
        assert set(call.kwargs) == {n for n, _ in spec.variants}


@pytest.mark.parametrize("spec", [s for s in OPS if s.activation], ids=lambda s: s.name)
def test_an_activation_s_variants_are_arguments_of_each_spelling(spec):
    names = {n for n, _ in spec.variants}
    for f in spec.functions:
        signatures = get_signature_for_torch_op(f) or [inspect.signature(f)]
        params = {p for sig in signatures for p in sig.parameters}
        assert names <= params, (f, names, params)
    for op in spec.aten:
        assert names <= set(get_signature_for_torch_op(op)[0].parameters), op
    for m in spec.methods:
        assert callable(getattr(torch.Tensor, m))


def test_a_module_subclass_with_its_own_forward_is_not_taken_for_its_base():
    class Lora(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    class Renamed(nn.Linear):
        pass

    assert targets.module_spelling(Lora(2, 2)) is None
    assert targets.module_spelling(Renamed(2, 2))[0].name == "linear"
    assert not targets.is_identity_module(type("Loud", (nn.Identity,), {"forward": lambda self, x: x + 1})())
