"""Progressive joining schedule, data sets, the training loop (resume, fuse at end) and DDP under torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from hypothesis import given
from hypothesis import strategies as st

import fxrep.models  # noqa: F401
from fxrep.errors import InputError
from fxrep.testing import compare_outputs
from fxrep.training import JoinSchedule, TrainConfig, load_mnist_idx, synthetic_shapes, train

MNIST = Path(__file__).resolve().parents[1] / "data" / "mnist-t10k"  # shipped with the repository
TINY = dict(num_classes=4, img_size=16, patch_size=8, in_chans=1, embed_dim=32, num_heads=2, init_values=0.1)


@given(total=st.integers(1, 500), warmup=st.floats(0, 0.5), ramp=st.floats(0, 0.5),
       shape=st.sampled_from(["linear", "cosine"]))
def test_join_schedule_holds_ramps_and_ends_joined(total, warmup, ramp, shape):
    s = JoinSchedule(total, warmup, ramp, shape)
    values = [s(i) for i in range(total + 1)]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert all(a <= b for a, b in zip(values, values[1:])), "lam never decreases"
    assert values[-1] == 1.0, "training ends fully joined"
    assert all(v == 0.0 for i, v in enumerate(values) if i < warmup * total)


def test_join_schedule_rejects_bad_fractions():
    with pytest.raises(ValueError, match="warmup"):
        JoinSchedule(10, warmup=0.7, ramp=0.5)
    with pytest.raises(ValueError, match="shape"):
        JoinSchedule(10, shape="step")


def test_synthetic_shapes_are_deterministic_and_labelled():
    a, b = synthetic_shapes(64, 16, seed=3), synthetic_shapes(64, 16, seed=3)
    assert torch.equal(a.tensors[0], b.tensors[0]) and a.tensors[0].shape == (64, 1, 16, 16)
    assert set(a.tensors[1].tolist()) <= {0, 1, 2, 3}


def test_missing_mnist_gets_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="--data"):
        load_mnist_idx(tmp_path)


def test_mnist_fixed_split():
    train_set, eval_set = load_mnist_idx(MNIST, "train"), load_mnist_idx(MNIST, "eval")
    assert len(train_set) == 8000 and len(eval_set) == 2000
    assert int(train_set[0][1]) == 7, "image 0 is a 7 and belongs to the training split"
    x = eval_set[0][0]
    assert x.shape == (1, 28, 28) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_train_joins_fuses_and_resumes(tmp_path):
    torch.manual_seed(0)
    data, held = synthetic_shapes(128, 16, seed=0), synthetic_shapes(64, 16, seed=1)
    model = timm.create_model("fxrep_deit_tiny_d3b4", **TINY)
    cfg = TrainConfig(steps=6, batch_size=32, out_dir=str(tmp_path), progress=False, checkpoint_every=3)
    result = train(model, data, held, cfg)
    assert model.join == 1.0 and result.steps == 6
    assert result.prediction_mismatches == 0 and result.fused_accuracy == result.eval_accuracy
    written = {p.name for p in tmp_path.iterdir()}
    assert {"fused.pt", "fused.safetensors", "fuse_report.txt", "metrics.jsonl"} <= written
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 7)) and lines[0]["lam"] == 0.0
    fused = torch.load(tmp_path / "fused.pt", weights_only=False)
    x = held.tensors[0][:4]
    compare_outputs(model.eval()(x), fused(x))

    resumed = timm.create_model("fxrep_deit_tiny_d3b4", **TINY)
    cfg2 = TrainConfig(steps=8, batch_size=32, out_dir=str(tmp_path), progress=False)
    result2 = train(resumed, data, held, cfg2, resume=True)
    assert result2.steps == 8
    assert [r["step"] for r in result2.history][-2:] == [7, 8] and len(result2.history) == 8


def _image_folder_tree(root: Path, classes: int = 2, per_class: int = 12) -> Path:
    """A tiny ImageFolder tree (train/ and val/) of generated 40 x 36 PNGs: each class one colour."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in range(classes):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(per_class if split == "train" else 4):
                noise = torch.randint(0, 60, (36, 40, 3), generator=g, dtype=torch.uint8)
                pixels = (noise + torch.tensor([120 * c, 80, 200 - 90 * c], dtype=torch.uint8)).numpy()
                Image.fromarray(pixels).save(root / split / f"class{c}" / f"{i}.png")
    return root


RECIPE_RUN = ["train", "--recipe", "imagenet", "--img-size", "32", "--patch-size", "8", "--epochs", "3",
              "--batch-size", "4", "--num-workers", "0"]


def _losses(out: Path) -> list:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_imagenet_recipe_resumes_where_it_stopped(tmp_path):
    """One process: a run stopped after step 5 and resumed takes the very steps of an uninterrupted run (the
    same losses, bit for bit on one machine: same data order, random state, optimizer and schedules)."""
    from fxrep.cli import main

    data = _image_folder_tree(tmp_path / "images")
    assert main([*RECIPE_RUN, "--data", str(data), "--out", str(tmp_path / "whole")]) == 0
    whole = _losses(tmp_path / "whole")
    assert len(whole) == 3 * (24 // 4)  # 3 epochs of 6 batches, across epoch boundaries
    parted = tmp_path / "parted"
    assert main([*RECIPE_RUN, "--data", str(data), "--out", str(parted), "--stop-at", "5"]) == 0
    assert not (parted / "fused.pt").exists() and len(_losses(parted)) == 5
    assert main([*RECIPE_RUN, "--data", str(data), "--out", str(parted), "--resume"]) == 0
    assert _losses(parted) == whole
    assert (parted / "fused.pt").is_file()


def test_the_imagenet_recipe_resumes_under_torchrun_with_two_processes(tmp_path):
    data = _image_folder_tree(tmp_path / "images")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

    def torchrun(out, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", "29517", "-m", "fxrep.cli", *RECIPE_RUN, "--data", str(data),
               "--out", str(out), *extra]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    torchrun(tmp_path / "whole")
    whole = _losses(tmp_path / "whole")
    assert len(whole) == 3 * (24 // 8)  # two processes of batch 4: 3 steps an epoch
    assert "stopped at step 4" in torchrun(tmp_path / "parted", "--stop-at", "4")
    assert "predictions differ" in torchrun(tmp_path / "parted", "--resume")
    assert _losses(tmp_path / "parted") == whole


def test_distributed_training_with_torchrun_on_cpu(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29513",
           "-m", "fxrep.cli", "train", "--dataset", "synthetic", "--synthetic-size", "128", "--img-size",
           "16",
           "--patch-size", "8", "--steps", "3", "--batch-size", "16", "--out", str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "fused.pt").is_file()
    assert "predictions differ" in done.stdout


def test_distillation_from_a_teacher_changes_the_loss(tmp_path):
    data = synthetic_shapes(64, 16, seed=0)
    teacher = timm.create_model("fxrep_deit_tiny_d3b4", **TINY).eval()
    losses = []
    for alpha in (0.0, 0.9):
        torch.manual_seed(0)
        model = timm.create_model("fxrep_deit_tiny_d3b4", **TINY)
        cfg = TrainConfig(steps=2, batch_size=32, progress=False, kd_alpha=alpha, fuse_at_end=False)
        losses.append(train(model, data, None, cfg, teacher=teacher).history[0]["loss"])
    assert losses[0] != losses[1]


def test_image_folder_dataset(tmp_path):
    from PIL import Image

    from fxrep.training.data import image_folder

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.new("RGB", (20, 24), (i * 100, 50, 0)).save(tmp_path / cls / f"{i}.png")
    ds = image_folder(tmp_path, img_size=16)
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and ds.classes == ["a", "b"]
    with pytest.raises(InputError, match="does not exist"):
        image_folder(tmp_path / "missing", 16)


@pytest.mark.parametrize("flag, gamma",
                         [([], 0.25), (["--init-values", "0.5"], 0.5), (["--init-values", "0"], None)])
def test_cli_layerscale_default_is_the_models(flag, gamma):
    """``fxrep train`` keeps the documented 1/B LayerScale of a B-branch model unless --init-values is
    given."""
    from fxrep.cli import build_model, parser

    args = parser().parse_args(["train", "--model", "fxrep_deit_tiny_d3b4", *flag])
    model = build_model(args, 1, 4, 16)
    ls = model.blocks[0].ls1[0]
    if gamma is None:
        assert isinstance(ls, torch.nn.Identity)
    else:
        assert torch.all(ls.gamma == gamma)
