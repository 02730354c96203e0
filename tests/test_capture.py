"""One call for any model (fxrep/api.py): where torch.fx cannot trace a model, ``fxrep.fuse`` captures it with
torch.export and returns a module called like the original; every piece of advice in a capture error works
when followed literally."""

import inspect

import pytest
import timm
import torch
import torch.nn as nn
import transformers
from vit_pytorch import ViT
from vit_pytorch.parallel_vit import ViT as ParallelViT

import fxrep
from fxrep.equivalence import assert_equivalent
from fxrep.snapshot import ModelSnapshot


def _image(batch: int):
    return (torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch)),)


def _einops_parallel_vit():
    torch.manual_seed(0)
    return ParallelViT(image_size=32, patch_size=8, num_classes=5, dim=32, depth=2, heads=2, dim_head=16,
                       mlp_dim=64, num_parallel_branches=2).eval()


def _hf_vit():
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, image_size=32, patch_size=8, num_labels=5)
    return transformers.ViTForImageClassification(config).eval()


@pytest.mark.parametrize("example_batch", [1, 2])
def test_a_model_fx_cannot_trace_is_captured_with_export_and_called_like_the_original(example_batch):
    model = _einops_parallel_vit()
    snapshot = ModelSnapshot(model)
    fused = fxrep.fuse(model, example_inputs=_image(example_batch))
    report = fused.meta["fxrep_report"]
    assert report.capture.startswith("torch.export (dynamic batch); torch.fx could not trace ViT")
    assert "captured with torch.export" in str(report)
    assert report.count("widen_attention") == 2 and report.count("widen_mlp") == 2  # the branches merged
    assert list(inspect.signature(fused.forward).parameters) == ["img"]
    for batch in (1, 2, 5):  # any batch, whichever batch the example had
        assert_equivalent(model, fused, _image(batch))
    assert snapshot.diff(model) == ""


def test_a_hugging_face_model_keeps_its_output_structure():
    model = _hf_vit()
    fused = fxrep.fuse(model, example_inputs=_image(2), check=True)
    out = fused(*_image(3))
    assert isinstance(out, transformers.modeling_outputs.ImageClassifierOutput)
    assert_equivalent(model, fused, _image(3))
    x = _image(1)[0]
    torch.testing.assert_close(fused(pixel_values=x).logits, model(pixel_values=x).logits)  # by keyword
    torch.testing.assert_close(fused(x, labels=None).logits, model(x).logits)  # a default
    with pytest.raises(fxrep.InputError, match="captured with interpolate_pos_encoding at its default"):
        fused(x, interpolate_pos_encoding=True)
    with pytest.raises(fxrep.InputError, match="output_hidden_states: .* captured without these arguments"):
        fused(x, output_hidden_states=True)


def test_a_model_fx_can_trace_stays_on_fx():
    model = timm.create_model("deit_tiny_patch16_224", depth=1, img_size=32, patch_size=8, num_classes=5)
    model.eval()
    report = fxrep.fuse(model, example_inputs=_image(1)).meta["fxrep_report"]
    assert report.capture == "torch.fx"
    exported = fxrep.fuse(model, example_inputs=_image(1), capture="export")
    assert exported.meta["fxrep_report"].capture == "torch.export (dynamic batch); capture='export'"
    assert_equivalent(model, exported, _image(4))


def test_without_example_inputs_the_error_says_export_needs_them_and_following_it_works():
    model = _einops_parallel_vit()
    with pytest.raises(fxrep.TraceError, match=r"fxrep.fuse\(model, example_inputs=\(x,\)\)") as info:
        fxrep.fuse(model)
    assert "Proxy" in str(info.value) or "could not trace" in str(info.value)
    fused = fxrep.fuse(model, example_inputs=_image(1))  # the advice, literally
    assert_equivalent(model, fused, _image(2))


def test_the_fx_only_error_points_at_export_and_following_it_works():
    model = _einops_parallel_vit()
    with pytest.raises(fxrep.TraceError, match=r"let fxrep capture it with torch.export, "
                                                r"fxrep.fuse\(model, example_inputs=\(x,\)\)"):
        fxrep.fuse(model, example_inputs=_image(1), capture="fx")
    advice = r"torch.export.export\(model, \(x,\)\)\) and pass the program"
    with pytest.raises(fxrep.TraceError, match=advice):
        fxrep.trace(model)
    program = torch.export.export(model, _image(2))  # the second advice, literally
    fused = fxrep.fuse(program)
    assert isinstance(fused, torch.export.ExportedProgram)
    assert_equivalent(model, fused.module(), _image(2))


def test_concrete_args_with_an_untraceable_model_says_to_leave_them_out_and_following_it_works():
    model = _einops_parallel_vit()
    with pytest.raises(fxrep.TraceError, match="leave them out"):
        fxrep.fuse(model, example_inputs=_image(1), concrete_args={})
    assert_equivalent(model, fxrep.fuse(model, example_inputs=_image(1)), _image(2))


class DataDependent(nn.Module):
    """Neither fx (a Proxy in ``if``) nor export (a guard on data) can capture this."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # the line the error must show
            return self.lin(x)
        return -x


def test_a_model_neither_can_capture_gets_one_error_with_both_causes_in_user_terms():
    with pytest.raises(fxrep.TraceError) as info:
        fxrep.fuse(DataDependent().eval(), example_inputs=(torch.randn(2, 4),))
    message = str(info.value)
    assert message.startswith("fxrep could not capture DataDependent.")
    assert "\ntorch.fx: torch.fx could not trace DataDependent" in message
    assert "\ntorch.export: " in message
    assert "test_capture.py" in message and "if x.sum() > 0:" in message  # the user's line, not torch's
    assert "Fix: make the model exportable" in message


def test_a_static_batch_model_is_captured_with_static_shapes():
    class FixedBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(4, 8)

        def forward(self, x):
            assert x.shape[0] == 3  # noqa: S101 - a model that only takes batches of 3
            return torch.relu(self.a(x)) + torch.relu(self.b(x)) + x.view(3, 4).sum()

    model = FixedBatch().eval()
    fused = fxrep.fuse(model, example_inputs=(torch.randn(3, 4),), capture="export")
    assert fused.meta["fxrep_report"].capture.startswith("torch.export (static shapes")
    assert_equivalent(model, fused, (torch.randn(3, 4),))


def test_capture_refuses_what_fx_refuses():
    model = _einops_parallel_vit().train()
    with pytest.raises(fxrep.TrainingModeError, match=r"model.eval\(\)"):
        fxrep.fuse(model, example_inputs=_image(1))
    with pytest.raises(fxrep.InputError, match="capture='onnx'.*'auto', 'fx', 'export'"):
        fxrep.fuse(_einops_parallel_vit(), example_inputs=_image(1), capture="onnx")
    with pytest.raises(fxrep.InputError, match="needs example inputs"):
        fxrep.fuse(_einops_parallel_vit(), capture="export")


def test_plain_einops_vit_fuses_exactly():
    torch.manual_seed(0)
    model = ViT(image_size=32, patch_size=8, num_classes=5, dim=32, depth=2, heads=2, dim_head=16,
                mlp_dim=64).eval()
    fused = fxrep.fuse(model, example_inputs=_image(2), check=True)
    assert fused.meta["fxrep_report"].after["sdpa"] == 2
    assert_equivalent(model, fused, _image(3))
