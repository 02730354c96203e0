"""The ImageNet-style recipe for branched ViTs: DeiT's, with progressive joining, on a folder of images.

``fxrep train --recipe imagenet --data DIR`` trains on ``DIR/train`` and evaluates on ``DIR/val`` (the
``torchvision.datasets.ImageFolder`` layout: one sub-folder per class): random resized crops and flips for
training, resize and center crop for evaluation, ImageNet normalization; AdamW with weight decay 0.05 and a
learning rate of 5e-4 per 512 images of global batch, warm-up then cosine, label smoothing 0.1, the join
schedule over the whole run, bf16 autocast on GPU, a checkpoint every epoch and ``--resume``. Each value can
be overridden from the command line; epochs become steps from the data set size and the number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .loop import TrainConfig

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Recipe:
    img_size: int = 224
    patch_size: int = 16
    batch_size: int = 256          # per process
    epochs: int = 300
    base_lr: float = 5e-4          # for a global batch of 512 images, scaled linearly with it
    weight_decay: float = 0.05
    warmup_epochs: float = 5
    label_smoothing: float = 0.1
    num_workers: int = 8


IMAGENET = Recipe()


def image_folders(root: str | Path, img_size: int):
    """(train, val) ImageFolder data sets of ``root/train`` and ``root/val`` with the recipe's transforms."""
    from torchvision import datasets, transforms

    root = Path(root)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise InputError(f"{root / split} does not exist: --recipe imagenet reads an ImageFolder tree, "
                             f"{root}/train/<class>/<image> and {root}/val/<class>/<image>")
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train = transforms.Compose([transforms.RandomResizedCrop(img_size), transforms.RandomHorizontalFlip(),
                                transforms.ToTensor(), normalize])
    val = transforms.Compose([transforms.Resize(int(round(img_size / 0.875))),
                              transforms.CenterCrop(img_size), transforms.ToTensor(), normalize])
    return datasets.ImageFolder(str(root / "train"), train), datasets.ImageFolder(str(root / "val"), val)


def recipe_config(recipe: Recipe, train_size: int, world: int, **overrides) -> TrainConfig:
    """The TrainConfig of ``recipe`` for a training set of ``train_size`` images on ``world`` processes.
    ``overrides`` (None values ignored) replace the recipe's or the config's fields; ``steps`` overrides the
    step count that ``epochs`` gives."""
    o = {k: v for k, v in overrides.items() if v is not None}
    batch = o.pop("batch_size", recipe.batch_size)
    epochs = o.pop("epochs", recipe.epochs)
    per_epoch = max(1, train_size // (batch * world))
    steps = o.pop("steps", int(epochs * per_epoch))
    lr = o.pop("lr", recipe.base_lr * batch * world / 512)
    o.setdefault("label_smoothing", recipe.label_smoothing)
    o.setdefault("num_workers", recipe.num_workers)
    o.setdefault("checkpoint_every", per_epoch)
    return TrainConfig(steps=steps, batch_size=batch, lr=lr, weight_decay=recipe.weight_decay,
                       warmup_lr_steps=int(recipe.warmup_epochs * per_epoch), **o)
