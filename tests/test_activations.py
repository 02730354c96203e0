"""Every activation is one declaration (an ``OpSpec`` in fxrep/ir/known_ops.py): each of its spellings, as a
module, a function, a Tensor method or an ATen overload in an exported program, is recognized from that
declaration alone, and parallel MLP branches with it widen exactly."""

import pytest
import torch
import torch.nn as nn

import fxrep
from fxrep.equivalence import assert_equivalent
from fxrep.ir.known_ops import ACTIVATIONS

SPECS = {s.name: s for s in ACTIVATIONS}


class Branches(nn.Module):
    """Two MLP branches on one input, the activation spelled as ``how``."""

    def __init__(self, spec, how: str):
        super().__init__()
        self.spec, self.how = spec, how
        self.up = nn.ModuleList(nn.Linear(6, 12) for _ in range(2))
        self.down = nn.ModuleList(nn.Linear(12, 6) for _ in range(2))
        variant = {name: _variant_value(name, default) for name, default in spec.variants}
        module = next(iter(spec.modules), None)
        self.act = nn.ModuleList(module(**variant) for _ in range(2)) if how == "module" else None
        self.kwargs = variant

    def activation(self, i, h):
        if self.how == "module":
            return self.act[i](h)
        if self.how == "method":
            return getattr(h, self.spec.methods[0])()
        return self.spec.functions[0](h, **self.kwargs)

    def forward(self, x):
        return x + sum(d(self.activation(i, u(x))) for i, (u, d) in enumerate(zip(self.up, self.down)))


def _variant_value(name, default):
    """A value other than the default, so that the variant is seen to carry through."""
    return {"approximate": "tanh"}.get(name, default / 2 if isinstance(default, float) else default)


CASES = [(name, how) for name, s in SPECS.items() for how in ("module", "function", "method", "exported")
         if how != "method" or s.methods]


@pytest.mark.parametrize("name,how", CASES, ids=[f"{n}-{h}" for n, h in CASES])
def test_each_spelling_of_each_activation_widens(name, how):
    torch.manual_seed(0)
    model = Branches(SPECS[name], "function" if how == "exported" else how).eval()
    x = torch.randn(2, 5, 6)
    batch = torch.export.Dim("batch", min=1)
    subject = torch.export.export(model, (x,), dynamic_shapes=({0: batch},)) if how == "exported" else model
    fused = fxrep.fuse(subject, example_inputs=(x,))
    if how == "exported":
        report, fused = fused.graph_module.meta["fxrep_report"], fused.module()
    else:
        report = fused.meta["fxrep_report"]
    assert report.count("widen_mlp") == 1, report
    assert report.after["activation"] == 1, report
    assert_equivalent(model, fused, (torch.randn(3, 5, 6),))


def test_different_variants_of_one_activation_do_not_widen():
    torch.manual_seed(0)
    model = Branches(SPECS["leaky_relu"], "module").eval()
    model.act[1].negative_slope = 0.3
    fused = fxrep.fuse(model, example_inputs=(torch.randn(2, 5, 6),), check=True)
    assert fused.meta["fxrep_report"].count("widen_mlp") == 0


def test_a_subclass_that_changes_forward_is_not_taken_for_its_base():
    """A graph that calls a subclass of nn.ReLU as a module (a leaf of the user's tracer): it is replaced by
    F.relu only where it inherits ReLU's forward unchanged."""
    class Shifted(nn.ReLU):
        def forward(self, x):
            return super().forward(x) + 1.0

    class Same(nn.ReLU):
        pass

    for cls, functional in ((Shifted, False), (Same, True)):
        root = nn.Module()
        root.act = cls()
        graph = torch.fx.Graph()
        graph.output(graph.call_module("act", (graph.placeholder("x"),)))
        gm = torch.fx.GraphModule(root, graph).eval()
        fused = fxrep.fuse(gm, example_inputs=(torch.randn(2, 4),), check=True)
        assert any(a.pattern == "functionalize_modules" for a in fused.meta["fxrep_report"].applied) \
            is functional
