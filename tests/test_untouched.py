"""Nothing of the user's is touched or kept: fusing leaves every input form README lists exactly as it was
(parameters, buffers, every attribute of every module, ``_guards_fn`` of ``ExportedProgram.module()``
included), and after ``fuse`` returns no fxrep cache holds the user's model, its modules or the fused
model."""

import gc
import weakref

import pytest
import timm
import torch
from torch import nn

import fxrep
from fxrep.snapshot import ModelSnapshot
from fxrep.testing import AttentionSpec, GeneratedAttentionBlock, GeneratedMlpBlock, MlpSpec, make_inputs


class ParallelMultiheadAttention(nn.Module):
    """Two ``nn.MultiheadAttention`` branches on one input (torchvision's spelling of attention)."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.a = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.b = nn.MultiheadAttention(dim, 2, batch_first=True)

    def forward(self, x):
        return x + self.a(x, x, x, need_weights=False)[0] + self.b(x, x, x, need_weights=False)[0]


def _branched():
    return nn.Sequential(GeneratedMlpBlock(MlpSpec(dim=8, branches=2, lam=1.0, seed=1)),
                         GeneratedAttentionBlock(AttentionSpec(dim=8, branches=2, seed=2))).eval()


def _exported(model, x):
    return torch.export.export(model, x, dynamic_shapes=({0: torch.export.Dim("batch")},))


FORMS = {
    "module": lambda model, x: model,
    "traced": lambda model, x: torch.fx.symbolic_trace(model),
    "exported_module": lambda model, x: _exported(model, x).module(),
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_fusing_leaves_every_input_form_as_it_was(form):
    model, x = _branched(), make_inputs(8, torch.float32)
    source = FORMS[form](model, x)
    before = ModelSnapshot(source)
    fused = fxrep.fuse(source, example_inputs=x, check=True)
    assert fused.meta["fxrep_report"].applied
    assert before.diff(source) == ""
    if form == "exported_module":
        assert source._guards_fn.training is True  # ExportedProgram.module()'s guard: never put in eval mode


def test_fusing_leaves_an_exported_program_as_it_was():
    model, x = _branched(), make_inputs(8, torch.float32)
    program = _exported(model, x)
    code, state = program.graph_module.code, {k: v.clone() for k, v in program.state_dict.items()}
    before = ModelSnapshot(program.graph_module)
    fxrep.fuse(program, check=True)
    assert program.graph_module.code == code and before.diff(program.graph_module) == ""
    assert program.state_dict.keys() == state.keys()
    assert all(torch.equal(program.state_dict[k], v) for k, v in state.items())


def _fuse_and_forget(make_model, x, export: bool) -> list:
    """Fuse a fresh model; return weak references to it, its modules, the input program and the result."""
    model = make_model().eval()
    source = torch.export.export(model, x) if export else model
    fused = fxrep.fuse(source, example_inputs=None if export else x)
    assert fused is not None
    return [weakref.ref(model), weakref.ref(fused), weakref.ref(source)] + [weakref.ref(m)
                                                                            for m in model.modules()]


MODELS = {
    "multihead_attention": (ParallelMultiheadAttention, (torch.randn(2, 5, 8),)),
    "timm_attention": (lambda: timm.create_model("vit_tiny_patch16_224", depth=2, img_size=32, patch_size=8),
                       (torch.randn(1, 3, 32, 32),)),
}


@pytest.mark.parametrize("export", [False, True], ids=["module", "exported_program"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_no_cache_keeps_the_models_alive(name, export):
    make_model, x = MODELS[name]
    refs = _fuse_and_forget(make_model, x, export)
    gc.collect()
    alive = sorted({type(r()).__name__ for r in refs if r() is not None})
    assert alive == [], f"still referenced after fuse returned and the models were dropped: {alive}"
