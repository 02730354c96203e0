"""Phones: fused models as ExecuTorch programs lowered to XNNPACK (fxrep/export/executorch.py), run with
``executorch.runtime``: fp32 parity with PyTorch, int8 on a model trained here on the real MNIST data, and the
errors that name their fix."""

import sys
from pathlib import Path

import pytest
import timm
import torch

import fxrep
import fxrep.models  # noqa: F401
from fxrep.equivalence import relative_error
from fxrep.export import calibration_inputs, run_executorch, to_executorch
from fxrep.numerics import MODEL_RTOL
from fxrep.training import TrainConfig, load_mnist_idx, train

pytest.importorskip("executorch", reason="the mobile extra (executorch) is installed by make test")

MNIST = Path(__file__).resolve().parents[1] / "data" / "mnist-t10k"  # shipped with the repository
SMALL = dict(embed_dim=32, num_heads=2, num_classes=5, img_size=32, patch_size=8)
PER_HEAD = fxrep.default_registry().without("rank_aware_attention")


def _fused(name: str, per_head: bool):
    torch.manual_seed(0)
    model = timm.create_model(name, **SMALL).eval()
    model.set_join(1.0)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return model, fxrep.fuse(model, example_inputs=(x,), patterns=PER_HEAD if per_head else None), x


# the three registered models in the rank-aware form fxrep picks for them, and d3b4 in the per-head form too
# and lowered as exported, without fxrep.export.xnnpack's rewrites and with every row computed (lowering takes
# seconds a model, so not every pair)
FORMS = [("fxrep_deit_tiny_d6b2", "rank_aware", True), ("fxrep_deit_tiny_d4b3", "rank_aware", True),
         ("fxrep_deit_tiny_d3b4", "rank_aware", True), ("fxrep_deit_tiny_d3b4", "per_head", True),
         ("fxrep_deit_tiny_d3b4", "rank_aware", False)]


@pytest.mark.parametrize("name,form,rewrites", FORMS,
                         ids=[f"{n}-{f}" + ("" if r else "-as-exported") for n, f, r in FORMS])
def test_fp32_programs_match_pytorch(name, form, rewrites, tmp_path):
    model, fused, x = _fused(name, form == "per_head")
    rank_aware = sum(a.pattern == "rank_aware_attention" for a in fused.meta["fxrep_report"].applied)
    assert (rank_aware > 0) == (form == "rank_aware")
    path = to_executorch(fused, (x,), tmp_path / f"{name}.pte", xnnpack_rewrites=rewrites,
                         prune_rows=rewrites)
    for seed in (1, 2):
        xs = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
        (y,) = run_executorch(path, (xs,))
        with torch.no_grad():
            assert relative_error(model(xs), y) <= MODEL_RTOL[torch.float32]


@pytest.fixture(scope="module")
def trained_d3b4():
    """A small d3b4 trained with progressive joining on the MNIST train split, fused."""
    train_set, eval_set = load_mnist_idx(MNIST, "train"), load_mnist_idx(MNIST, "eval")
    torch.manual_seed(0)
    model = timm.create_model("fxrep_deit_tiny_d3b4", embed_dim=64, num_heads=2, num_classes=10, img_size=28,
                              patch_size=7,
                    in_chans=1)
    result = train(model, train_set, None, TrainConfig(steps=150, batch_size=64, progress=False))
    return result.fused, train_set, eval_set


def test_int8_program_agrees_with_fp32_and_is_smaller(trained_d3b4, tmp_path):
    fused, train_set, eval_set = trained_d3b4
    x = train_set[0][0].unsqueeze(0)
    calibration = calibration_inputs(train_set)  # 200 training images
    assert len(calibration) == 200 and calibration[1][0].shape == (1, 1, 28, 28)
    fp32 = to_executorch(fused, (x,), tmp_path / "fp32.pte")
    int8 = to_executorch(fused, (x,), tmp_path / "int8.pte", quantize="int8", calibration=calibration)
    assert fp32.stat().st_size >= 3 * int8.stat().st_size, (fp32.stat().st_size, int8.stat().st_size)
    from fxrep.export import load_executorch

    run32, run8 = load_executorch(fp32), load_executorch(int8)
    images = eval_set.tensors[0]
    agree = sum(int(run_executorch(run32, (img[None],))[0].argmax() == run_executorch(run8,
                                                                                      (img[None],))[0].argmax())
                for img in images)
    assert agree >= 0.95 * len(images), f"int8 agrees with fp32 on {agree} of {len(images)} eval images"


def test_errors_name_their_fix(tmp_path, monkeypatch):
    model, fused, x = _fused("fxrep_deit_tiny_d3b4", per_head=False)
    with pytest.raises(fxrep.InputError, match=r"calibration=\[\(x,\), \.\.\.\]"):
        to_executorch(fused, (x,), tmp_path / "q.pte", quantize="int8")
    with pytest.raises(fxrep.InputError, match="choose one of"):
        to_executorch(fused, (x,), tmp_path / "q.pte", quantize="fp16")
    with pytest.raises(fxrep.TrainingModeError, match=r"model.eval\(\)"):
        to_executorch(model.train(), (x,), tmp_path / "t.pte")
    with pytest.raises(fxrep.InputError, match="no ExecuTorch program"):
        run_executorch(tmp_path / "missing.pte", (x,))
    monkeypatch.setitem(sys.modules, "executorch.exir", None)  # as if executorch were not installed
    with pytest.raises(fxrep.MissingDependencyError, match=r"pip install 'fxrep\[mobile\]'"):
        to_executorch(fused, (x,), tmp_path / "f.pte")


def test_cli_writes_an_executorch_program(tmp_path):
    from fxrep.cli import main

    model, _, x = _fused("fxrep_deit_tiny_d3b4", per_head=False)
    torch.save(model, tmp_path / "model.pt")
    for flags in ([], ["--all-rows"]):
        out = tmp_path / f"fused{len(flags)}.pte"
        assert main(["fuse", str(tmp_path / "model.pt"), "--input-shape", "1,3,32,32", "--out",
                     str(tmp_path / "fused.pt"), "--executorch", str(out), *flags]) == 0
        (y,) = run_executorch(out, (x,))
        with torch.no_grad():
            assert relative_error(model(x), y) <= MODEL_RTOL[torch.float32]


def test_exported_programs_and_their_modules_are_accepted(tmp_path):
    """``ep.module()`` is a GraphModule in training mode that cannot be put in eval mode; it computes the same
    thing either way, so it is not refused as a model in training mode."""
    model, fused, x = _fused("fxrep_deit_tiny_d3b4", per_head=False)
    program = torch.export.export(fused, (x,))
    for i, form in enumerate((program, program.module())):
        (y,) = run_executorch(to_executorch(form, (x,), tmp_path / f"{i}.pte"), (x,))
        with torch.no_grad():
            assert relative_error(model(x), y) <= MODEL_RTOL[torch.float32]
