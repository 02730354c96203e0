"""Fused models export with torch.export and to ONNX, and survive save/load."""

import pytest
import timm
import torch

import fxrep
import fxrep.models  # noqa: F401
from fxrep.export import export_program, load_fused, save_fused, to_onnx
from fxrep.testing import relative_error

SMALL = dict(num_classes=10, img_size=32, patch_size=8, in_chans=1, init_values=0.5)


@pytest.fixture(scope="module", params=["rank_aware", "per_head"])
def fused(request):
    torch.manual_seed(0)
    model = timm.create_model("fxrep_deit_tiny_d3b4", **SMALL).eval()
    model.set_join(1.0)
    x = (torch.randn(2, 1, 32, 32),)
    registry = fxrep.default_registry()
    if request.param == "per_head":
        registry = registry.without("rank_aware_attention")
    return fxrep.fuse(model, example_inputs=x, patterns=registry, check=True), x


def test_torch_export(fused):
    gm, x = fused
    ep = export_program(gm, x)
    assert relative_error(gm(*x), ep.module()(*x)) < 1e-6


def test_save_and_load(fused, tmp_path):
    gm, x = fused
    save_fused(gm, tmp_path, x)
    assert (tmp_path / "fused.safetensors").is_file()
    again = load_fused(tmp_path)
    assert relative_error(gm(*x), again(*x)) < 1e-6


def test_onnx_runtime_matches_pytorch(fused, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    gm, x = fused
    path = to_onnx(gm, x, tmp_path / "fused.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    (got,) = session.run(None, {name: x[0].numpy()})
    assert relative_error(gm(*x), torch.from_numpy(got)) < 1e-5
