"""fxrep.fuse computes only the token rows the outputs read, in every form it returns (fxrep.row_pruning): a
GraphModule from a module or a traced graph, and an ExportedProgram (ATen and core ATen). The same
hypothesis cases as tests/test_rows.py (which tests the ATen rewrite the deployment path uses): transformer
shapes, poolings, masks and near misses that mix tokens. Each case is exact on a fresh input of another batch
size, and the Linears run on the rows expected; ``prune_rows=False`` computes every row."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_rows import TOLERANCE, Toy, toy_case

import fxrep
from fxrep.equivalence import relative_error
from fxrep.ir import as_linear
from fxrep.ir.recorded import recorded_shape

aten = torch.ops.aten
FORMS = ("module", "traced", "exported", "core_aten")


def _fuse(model, x, form: str, **options):
    """The fused model as a callable, and the token count each 3-d Linear of it runs on, in graph order."""
    if form in ("module", "traced"):
        subject = torch.fx.symbolic_trace(model) if form == "traced" else model
        gm = fxrep.fuse(subject, example_inputs=(x,), **options)
        shapes = [tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes
                  if as_linear(n) is not None and "tensor_meta" in n.meta]
        return gm, [s[1] for s in shapes if len(s) == 3], gm.meta["fxrep_report"]
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    if form == "core_aten":
        program = program.run_decompositions()
    fused = fxrep.fuse(program, example_inputs=(x,), **options)
    rows = [recorded_shape(n)[1] for n in fused.graph.nodes
            if n.target is aten.linear.default and len(recorded_shape(n)) == 3]
    return fused.module(), rows, fused.graph_module.meta["fxrep_report"]


def _expected(model, n: int):
    """(rows of the last block's output projection and MLP, whether anything is pruned)."""
    if model.pool in ("first", "last", "range") and model.mixer == "none":
        return (2 if model.pool == "range" else 1), True
    return n, False


@settings(max_examples=16, deadline=None)
@given(case=toy_case(), form=st.sampled_from(FORMS))
def test_fused_forms_compute_only_the_rows_read(case, form):
    model, x = case
    x = torch.cat([x, x]) if x.shape[0] == 1 else x  # export specializes a batch of one
    fused, rows, report = _fuse(model, x, form)
    fresh = torch.randn(x.shape[0] + 1, *x.shape[1:])
    with torch.no_grad():
        assert relative_error(model(fresh), fused(fresh)) <= TOLERANCE
    n = x.shape[1]
    want, pruned = _expected(model, n)
    if pruned or model.pool in ("avg", "two"):  # (after a token mixer, the ops after it may be cut)
        assert report.count("prune_unread_rows") == int(pruned), report
    blocks = rows[:-1] if model.mixer == "token_linear" else rows  # the token mixer's Linear is 3-d too
    assert blocks[-2:] == [want, want], rows  # the last MLP
    assert n in blocks, rows  # the first block's values (and keys) need every token
    if not pruned:
        assert set(blocks) == {n}, rows


@pytest.mark.parametrize("form", FORMS)
def test_prune_rows_false_computes_every_row(form):
    torch.manual_seed(0)
    model, x = Toy(8, 2, 2, "rows", "none", "first", 5).eval(), torch.randn(2, 5, 8)
    fused, rows, report = _fuse(model, x, form, prune_rows=False)
    assert set(rows) == {5} and report.count("prune_unread_rows") == 0
    fused, rows, report = _fuse(model, x, form)
    assert rows[-2:] == [1, 1] and report.count("prune_unread_rows") == 1
    with torch.no_grad():
        assert relative_error(model(x), fused(x)) <= TOLERANCE


def test_without_example_inputs_nothing_is_pruned():
    torch.manual_seed(0)
    model = Toy(8, 2, 1, "none", "none", "first", 5).eval()
    gm = fxrep.fuse(model)
    assert gm.meta["fxrep_report"].count("prune_unread_rows") == 0
    assert not any(n.target is torch.narrow for n in gm.graph.nodes)


def test_fused_timm_vit_runs_its_last_block_on_the_class_token():
    """timm's DeiT: its last block's output projection and MLP run on the class token alone, the first
    block's qkv on every token; exact at another batch size."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", depth=2, img_size=32, patch_size=8,
                              num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    fused, rows, report = _fuse(model, x, "module")
    assert report.count("prune_unread_rows") == 1
    assert rows[-2:] == [1, 1] and 17 in rows, rows
    fresh = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(model(fresh), fused(fresh)) <= TOLERANCE


@settings(max_examples=4, deadline=None)
@given(case=toy_case())
def test_onnx_of_a_fused_model_computes_only_the_rows_read(case, tmp_path_factory):
    """The ONNX form: ``to_onnx`` of the fused GraphModule (itself pruned), run in ONNX Runtime."""
    ort = pytest.importorskip("onnxruntime")
    from fxrep.export import to_onnx

    model, x = case
    x = torch.cat([x, x]) if x.shape[0] == 1 else x
    gm = fxrep.fuse(model, example_inputs=(x,))
    path = to_onnx(gm, (x,), tmp_path_factory.mktemp("onnx") / "fused.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert relative_error(model(x), torch.from_numpy(y)) <= TOLERANCE
