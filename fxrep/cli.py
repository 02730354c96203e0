"""``fxrep`` command line: ``fxrep demo``, ``fxrep train ...``, ``fxrep fuse ...``."""

from __future__ import annotations

import argparse
import sys


def build_model(args, in_chans: int, num_classes: int, img_size: int):
    """The model ``fxrep train`` trains. ``--init-values`` overrides the model's own LayerScale default (1/B
    for fxrep's branched models) only when given."""
    import timm

    import fxrep.models  # noqa: F401

    layerscale = {} if args.init_values is None else {"init_values": args.init_values}
    patch = args.patch_size or (16 if getattr(args, "recipe", None) else 8)
    return timm.create_model(args.model, num_classes=num_classes, in_chans=in_chans, img_size=img_size,
                             patch_size=patch, **layerscale)


def _data(args):
    """(train set, eval set, channels, classes, image size) of ``fxrep train``'s arguments."""
    from fxrep.training import load_mnist_idx, synthetic_shapes
    from fxrep.training.data import image_folder
    from fxrep.training.recipe import IMAGENET, image_folders

    if args.recipe == "imagenet":
        img = args.img_size or IMAGENET.img_size
        train_set, eval_set = image_folders(args.data, img)
        return train_set, eval_set, 3, len(train_set.classes), img
    if args.dataset == "mnist":
        return load_mnist_idx(args.data, "train"), load_mnist_idx(args.data, "eval"), 1, 10, 28
    if args.dataset == "synthetic":
        img = args.img_size or 32
        return (synthetic_shapes(args.synthetic_size, img, 1, 4, seed=args.seed),
                synthetic_shapes(512, img, 1, 4, seed=args.seed + 1), 1, 4, img)
    img = args.img_size or 224
    train_set = image_folder(f"{args.data}/train", img)
    return train_set, image_folder(f"{args.data}/val", img), 3, len(train_set.classes), img


def _config(args, train_size: int, kd_alpha: float):
    import os

    from fxrep.training import TrainConfig
    from fxrep.training.recipe import IMAGENET, recipe_config

    common = dict(seed=args.seed, out_dir=args.out, kd_alpha=kd_alpha, join_shape=args.join_shape,
                  stop_at=args.stop_at)
    if args.recipe == "imagenet":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return recipe_config(IMAGENET, train_size, world, steps=args.steps, epochs=args.epochs,
                             batch_size=args.batch_size, lr=args.lr, num_workers=args.num_workers,
                             checkpoint_every=args.checkpoint_every or None, **common)
    return TrainConfig(steps=args.steps or 500, batch_size=args.batch_size or 64, lr=args.lr or 1e-3,
                       checkpoint_every=args.checkpoint_every, num_workers=args.num_workers or 0, **common)


def _train(args) -> int:
    import torch

    from fxrep.training import train
    from fxrep.training.loop import seed_everything

    train_set, eval_set, chans, classes, img = _data(args)
    seed_everything(args.seed)  # the same initial weights in every run of one seed
    model = build_model(args, chans, classes, img)
    teacher = torch.load(args.teacher, weights_only=False) if args.teacher else None
    cfg = _config(args, len(train_set), args.kd_alpha if teacher is not None else 0.0)
    result = train(model, train_set, eval_set, cfg, teacher=teacher, resume=args.resume)
    if result.steps < cfg.steps:
        print(f"stopped at step {result.steps} of {cfg.steps}; continue with --resume")
    elif result.eval_accuracy is not None:
        print(f"eval accuracy {100 * result.eval_accuracy:.2f}%", end="")
        if result.fused_accuracy is not None:
            print(f"; fused {100 * result.fused_accuracy:.2f}% ({result.prediction_mismatches} predictions "
                  "differ)")
        else:
            print()
    print(f"outputs in {args.out}")
    return 0


def _fuse(args) -> int:
    import torch

    import fxrep

    model = torch.load(args.model, weights_only=False).eval()
    shape = tuple(int(s) for s in args.input_shape.split(","))
    fused = fxrep.fuse(model, example_inputs=(torch.randn(shape),), check=True)
    torch.save(fused, args.out)
    print(fused.meta["fxrep_report"])
    print(f"fused model written to {args.out}")
    if args.executorch:
        from fxrep.export import calibration_inputs, to_executorch
        from fxrep.training import load_mnist_idx

        calibration = None
        if args.int8:
            if args.calibration is None:
                raise SystemExit("--int8 needs --calibration DIR (an MNIST IDX directory of real inputs).")
            calibration = calibration_inputs(load_mnist_idx(args.calibration, "train"))
        path = to_executorch(fused, (torch.randn(shape),), args.executorch,
                             quantize="int8" if args.int8 else None,
                             calibration=calibration, prune_rows=not args.all_rows)
        print(f"ExecuTorch program (XNNPACK{', int8' if args.int8 else ''}) written to {path}")
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fxrep", description="exact reparameterization of branched ViTs")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="train, join, fuse and compare a small branched DeiT (a few minutes on CPU)")
    t = sub.add_parser("train", help="train a branched ViT with progressive joining, then fuse it")
    t.add_argument("--model", default="fxrep_deit_tiny_d3b4")
    t.add_argument("--recipe", choices=["imagenet"], default=None,
                   help="imagenet: DeiT's recipe with joining, on an ImageFolder tree --data DIR "
                        "(train/, val/)")
    t.add_argument("--dataset", choices=["mnist", "synthetic", "folder"], default="synthetic")
    t.add_argument("--data", default=None, help="MNIST IDX directory, or an ImageFolder root with train/ and "
                                                "val/")
    t.add_argument("--steps", type=int, default=None, help="default 500, or the recipe's epochs")
    t.add_argument("--epochs", type=float, default=None, help="with --recipe: epochs instead of steps")
    t.add_argument("--batch-size", type=int, default=None, help="per process (default 64; recipe 256)")
    t.add_argument("--lr", type=float, default=None, help="default 1e-3; recipe 5e-4 per 512 images")
    t.add_argument("--img-size", type=int, default=None)
    t.add_argument("--patch-size", type=int, default=None, help="default 8; recipe 16")
    t.add_argument("--num-workers", type=int, default=None, help="data loading processes (recipe 8)")
    t.add_argument("--stop-at", type=int, default=None,
                   help="stop after this step with a checkpoint (continue later with --resume)")
    t.add_argument("--init-values", type=float, default=None,
                   help="LayerScale init (default: the model's, 1/B for fxrep's branched models; 0: no "
                        "LayerScale)")
    t.add_argument("--join-shape", choices=["cosine", "linear"], default="cosine")
    t.add_argument("--synthetic-size", type=int, default=4096)
    t.add_argument("--teacher", default=None, help="a torch.save'd teacher model for distillation")
    t.add_argument("--kd-alpha", type=float, default=0.5)
    t.add_argument("--checkpoint-every", type=int, default=0)
    t.add_argument("--resume", action="store_true")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default="runs/train")
    f = sub.add_parser("fuse", help="fuse a torch.save'd model and save the GraphModule")
    f.add_argument("model")
    f.add_argument("--input-shape", required=True, help="e.g. 1,3,224,224")
    f.add_argument("--out", default="fused.pt")
    f.add_argument("--executorch", default=None, metavar="OUT.pte",
                   help="also write an XNNPACK-lowered ExecuTorch program (needs the mobile extra)")
    f.add_argument("--int8", action="store_true", help="quantize the ExecuTorch program to int8 (PT2E, "
                                                       "XNNPACK)")
    f.add_argument("--calibration", default=None, metavar="DIR",
                   help="with --int8: an MNIST IDX directory whose train split (200 images) calibrates")
    f.add_argument("--all-rows", action="store_true",
                   help="compute every token row in the ExecuTorch program (default: only the rows the "
                        "output reads)")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.command == "demo":
        from fxrep.demo import main as demo

        return demo([])
    if args.command == "train":
        return _train(args)
    return _fuse(args)


if __name__ == "__main__":
    sys.exit(main())
