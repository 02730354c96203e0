"""The torch.export front end: ExportedProgram in, ExportedProgram out (fxrep/program.py), and ATen spellings
read like torch-level ones (fxrep/ir/aten.py). Models written by others go through it in
tests/test_conformance.py ("exported" flow, Hugging Face rows)."""

import inspect

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.export import Dim
from torch.fx.operator_schemas import get_signature_for_torch_op

import fxrep
import fxrep.models  # noqa: F401
from fxrep.equivalence import assert_equivalent, compare_outputs
from fxrep.frontend.spellings import TABLE
from fxrep.ir.opspec import DROP, IDENTITY, Call


def _d3b4():
    torch.manual_seed(0)
    model = timm.create_model("fxrep_deit_tiny_d3b4", embed_dim=32, num_heads=2, num_classes=5, img_size=32,
                              patch_size=8).eval()
    model.set_join(1.0)
    return model


def _images(batch: int):
    return (torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch)),)


@pytest.fixture(scope="module")
def d3b4_program():
    model = _d3b4()
    return model, torch.export.export(model, _images(2), dynamic_shapes=({0: Dim("batch", min=1)},))


def _fingerprint(ep) -> tuple:
    return (ep.graph_module.code, str(ep.graph_signature),
            {k: v.clone() for k, v in ep.state_dict.items()}, dict(ep.constants))


def test_export_fuse_save_load_run_is_exact(d3b4_program, tmp_path):
    model, ep = d3b4_program
    fused = fxrep.fuse(ep)
    assert isinstance(fused, torch.export.ExportedProgram)
    report = fused.graph_module.meta["fxrep_report"]
    assert (report.after["sdpa"], report.after["activation"]) == (3, 3), report
    path = tmp_path / "fused.pt2"
    torch.export.save(fused, path)
    loaded = torch.export.load(path).module()
    for batch in (1, 2, 5):  # the batch dimension stays dynamic
        assert_equivalent(model, loaded, _images(batch))


def test_the_input_program_is_never_modified(d3b4_program):
    _, ep = d3b4_program
    code, signature, state, constants = _fingerprint(ep)
    fxrep.fuse(ep, check=True)
    assert ep.graph_module.code == code and str(ep.graph_signature) == signature
    assert ep.state_dict.keys() == state.keys()
    assert all(torch.equal(ep.state_dict[k], v) for k, v in state.items())


def test_exported_module_graphs_fuse_like_the_program(d3b4_program):
    model, ep = d3b4_program
    from_program = fxrep.fuse(ep).graph_module.meta["fxrep_report"].after
    gm = fxrep.fuse(ep.module(), example_inputs=_images(2))  # no TrainingModeError for export's _guards_fn
    assert isinstance(gm, torch.fx.GraphModule)
    after = gm.meta["fxrep_report"].after
    assert {k: after[k] for k in ("sdpa", "linear", "activation")} == \
        {k: from_program[k] for k in ("sdpa", "linear", "activation")}
    assert_equivalent(model, gm, _images(2))


def test_a_program_exported_in_training_mode_is_refused_with_the_fix():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).train()
    ep = torch.export.export(model, (torch.randn(3, 4),))
    with pytest.raises(fxrep.TrainingModeError, match=r"running statistics.*model\.eval\(\)"):
        fxrep.fuse(ep)


def test_other_dynamic_dimensions_are_refused_with_the_fix():
    model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8)).eval()
    ep = torch.export.export(model, (torch.randn(2, 5, 8),), dynamic_shapes=({0: Dim("b"), 1: Dim("n")},))
    with pytest.raises(fxrep.UnsupportedModelError, match=r"dynamic dimension\(s\) \[1\].*dim 0"):
        fxrep.fuse(ep)
    with pytest.raises(fxrep.InputError, match="concrete_args"):
        fxrep.fuse(torch.export.export(model, (torch.randn(2, 5, 8),)), concrete_args={"x": None})


def _counts(program) -> dict:
    after = program.graph_module.meta["fxrep_report"].after
    return {k: after[k] for k in ("linear", "sdpa", "softmax", "activation", "layer_norm")}


def test_a_core_aten_program_fuses_like_the_default_one(d3b4_program):
    # after run_decompositions a Linear is view -> addmm(b, x, permute(w)) -> view, a batched matmul
    # expand -> clone -> view -> bmm -> view, LayerNorm native_layer_norm()[0]: fxrep/frontend/core_aten.py
    # folds them back
    model, ep = d3b4_program
    fused = fxrep.fuse(ep.run_decompositions())
    assert _counts(fused) == _counts(fxrep.fuse(ep))
    for batch in (2, 3):
        assert_equivalent(model, fused.module(), _images(batch))


class Products(nn.Module):
    """A broadcast batched matmul (folded back: matmul broadcasts itself), and decompositions that look
    foldable but are not: a Linear whose bias broadcasts over rows, a LayerNorm whose statistics are read."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.randn(1, 5, 8))
        self.w, self.b = nn.Parameter(torch.randn(6, 5)), nn.Parameter(torch.randn(1, 6))

    def forward(self, x):  # x: (batch, 8, 5)
        y = torch.matmul(self.a, x)                         # (1, 5, 8) @ (batch, 8, 5): a is expanded
        z = torch.addmm(self.b, y.flatten(0, 1), self.w.t())  # bias (1, 6) broadcast over rows
        out, mean, rstd = torch.ops.aten.native_layer_norm.default(z, [6], None, None, 1e-5)
        return out + mean * rstd


def test_decompositions_fold_only_where_exact():
    torch.manual_seed(0)
    model = Products().eval()
    x = torch.randn(3, 8, 5)
    ep = torch.export.export(model, (x,)).run_decompositions()
    fused = fxrep.fuse(ep)
    assert_equivalent(model, fused.module(), (x,))
    code = fused.graph_module.code
    assert "aten.matmul" in code and "bmm" not in code
    assert "addmm" in code and "native_layer_norm" in code


class ConstantMaskAttention(nn.Module):
    """SDPA with a boolean mask built from ``arange`` (as Hugging Face's sdpa models do), or read from an
    input."""

    def __init__(self, mask: str):
        super().__init__()
        self.qkv, self.mask = nn.Linear(8, 24), mask

    def forward(self, x, m):  # x: (batch, 5, 8)
        q, k, v = self.qkv(x).view(x.shape[0], 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
        i = torch.arange(5)
        mask = {"all_true": (i[None, :] >= 0).expand(x.shape[0], 1, 5, 5),
                "empty_first_row": i[None, :] < i[:, None],  # row 0 masks every key: SDPA gives it zeros
                "input": m}[self.mask]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(x.shape[0], 5,
                                                                                               8)


@pytest.mark.parametrize("mask", ["all_true", "empty_first_row", "input"])
def test_core_aten_safe_softmax_folds_only_under_a_finite_constant_mask(mask):
    """Core ATen spells SDPA's softmax as ``where(row all -inf, 0, softmax(s))`` and a boolean mask as
    ``s + where(mask, 0, -inf)``. The ``where`` is dropped only when the mask is a constant with no -inf (an
    all-True mask); a row masked throughout, or a mask from an input, keeps it, and the output stays exact."""
    torch.manual_seed(0)
    model = ConstantMaskAttention(mask).eval()
    x, m = torch.randn(2, 5, 8), torch.rand(2, 1, 5, 5) > 0.3
    batch = Dim("batch", min=1)
    ep = torch.export.export(model, (x, m), dynamic_shapes=({0: batch}, {0: batch})).run_decompositions()
    fused = fxrep.fuse(ep)
    for b in (2, 3):
        args = (torch.randn(b, 5, 8), torch.rand(b, 1, 5, 5) > 0.3)
        assert_equivalent(model, fused.module(), args)
    report = fused.graph_module.meta["fxrep_report"]
    assert report.after["sdpa"] == (1 if mask == "all_true" else 0), report


@pytest.mark.parametrize("op", sorted(TABLE, key=str), ids=str)
def test_every_aten_spelling_binds_on_its_schema(op):
    """Each converter reads only names the overload's schema has, and returns a call whose first argument is
    the op's input (slices need the input's recorded shape and decline without it)."""
    target, convert = TABLE[op]
    sig = get_signature_for_torch_op(op)[0]
    dummies = {bool: False, int: 0}
    bound = {name: (p.default if p.default is not inspect.Parameter.empty else dummies.get(p.annotation,
                                                                                           object()))
             for name, p in sig.parameters.items()}
    call = convert(bound)
    if op is torch.ops.aten.slice.Tensor:
        assert call is None
        return
    if call in (IDENTITY, DROP):
        return
    args = call.args if isinstance(call, Call) else call[0]
    assert args[0] is bound[next(iter(sig.parameters))] or op is torch.ops.aten.rsub.Scalar


class Slices(nn.Module):
    """Slices export spells as aten.slice with negative or out-of-range bounds."""

    def forward(self, x):  # x: (batch, 7, 4)
        return torch.cat([x[:, :-2], x[:, 1:100], x[:, -3:], x[:, 5:3]], dim=1) * 2


def test_slices_with_negative_or_large_bounds_stay_exact():
    model = Slices().eval()
    x = torch.randn(2, 7, 4)
    fused = fxrep.fuse(torch.export.export(model, (x,)))
    assert_equivalent(model, fused.module(), (x,))


def test_export_program_refuses_a_training_model_and_leaves_it_as_it_is():
    from fxrep.export import export_program

    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).train()
    x = torch.randn(2, 4)
    with pytest.raises(fxrep.TrainingModeError, match=r"model.eval\(\)"):
        export_program(model, (x,))
    assert all(m.training for m in model.modules())  # not switched to eval mode behind the caller's back
    program = export_program(model.eval(), x)
    assert torch.equal(program.module()(x), model(x))


def _onnx_slice_count(path) -> int:
    import onnx

    return sum(1 for n in onnx.load(str(path)).graph.node if n.op_type in ("Slice", "Gather"))


def test_to_onnx_runs_in_onnxruntime_and_refuses_a_training_model(tmp_path):
    """A fused d3b4 in ONNX (torch's dynamo exporter), with and without row pruning, computes what the fused
    module computes in ONNX Runtime;
    a model in training mode is refused and left in training mode (to_onnx used to call .eval() on it)."""
    ort = pytest.importorskip("onnxruntime")
    from fxrep.export import to_onnx

    model = _d3b4()
    (x,) = _images(2)
    sizes = {}
    for prune in (True, False):  # only the rows the output reads (the class token in the last block), or all
        fused = fxrep.fuse(model, example_inputs=(x,), prune_rows=prune)
        path = to_onnx(fused, (x,), tmp_path / f"fused_{prune}.onnx", prune_rows=prune)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            compare_outputs(model(x), torch.from_numpy(y), 1e-5)
        sizes[prune] = _onnx_slice_count(path)
    assert sizes[True] > sizes[False]  # the pruned graph selects rows early
    fused.train()
    with pytest.raises(fxrep.TrainingModeError, match=r"model.eval\(\)"):
        to_onnx(fused, (x,), tmp_path / "refused.onnx")
    assert fused.training and not (tmp_path / "refused.onnx").exists()
