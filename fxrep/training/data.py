"""Datasets for training and accuracy runs: MNIST IDX files, ImageFolder trees, and generated images."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ..errors import InputError

MNIST_FILES = {
    "images": ("t10k-images-idx3-ubyte.gz",
               "167310007f03058885c7e95e6c0b19c20de5c7fd3031f4cbdadc9014a523d80b"),
    "labels": ("t10k-labels-idx1-ubyte.gz",
               "fc607395669ec21321ea83e4b82c0544b7e8e63ff5b34337c06bc0a17cc0da3c"),
}
# shipped in the repository (data/mnist-t10k, with its source and license); an installed fxrep has no copy
DEFAULT_MNIST = Path(__file__).resolve().parents[2] / "data" / "mnist-t10k"


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_mnist_idx(root: str | Path | None = None, split: str = "train",
                   verify: bool = True) -> TensorDataset:
    """The MNIST t10k set with the project's fixed split: ``eval`` = the 2,000 images with ``i % 5 == 4``,
    ``train`` = the other 8,000. Images are float32 (N, 1, 28, 28) in [0, 1]."""
    root = Path(root) if root is not None else DEFAULT_MNIST
    paths = {k: root / name for k, (name, _) in MNIST_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise InputError(f"MNIST files not found: {', '.join(missing)}. Pass --data DIR with "
                         f"{' and '.join(n for n, _ in MNIST_FILES.values())} (the IDX files of the MNIST "
                         "test set; a checkout of the fxrep repository has them in data/mnist-t10k), or use "
                         "--dataset synthetic.")
    if verify:
        for key, (_, digest) in MNIST_FILES.items():
            if hashlib.sha256(paths[key].read_bytes()).hexdigest() != digest:
                raise InputError(f"{paths[key]} does not have the expected sha256 {digest}: the file is "
                                 "damaged or not the MNIST t10k set")
    images = torch.from_numpy(_read_idx(paths["images"]).copy()).float().div_(255).unsqueeze(1)
    labels = torch.from_numpy(_read_idx(paths["labels"]).astype(np.int64))
    index = torch.arange(len(labels))
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    keep = (index % 5 == 4) if split == "eval" else (index % 5 != 4)
    return TensorDataset(images[keep], labels[keep])


def synthetic_shapes(n: int, img_size: int = 32, channels: int = 1, num_classes: int = 4, seed: int = 0,
                     noise: float = 0.15) -> TensorDataset:
    """Generated images of ``num_classes`` (<= 6) pattern classes (stripes, checks, rings, diagonals) at
    random phase and scale plus noise: a learnable task that needs no download."""
    if not 2 <= num_classes <= 6:
        raise ValueError("num_classes must be in 2..6")
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, img_size), torch.linspace(-1, 1, img_size), indexing="ij")
    freq = 2 + 4 * torch.rand(n, 1, 1, generator=g)
    phase = 6.283 * torch.rand(n, 1, 1, generator=g)
    patterns = torch.stack([
        torch.sin(freq * 3 * yy + phase),                       # horizontal stripes
        torch.sin(freq * 3 * xx + phase),                       # vertical stripes
        torch.sin(freq * 3 * xx + phase) * torch.sin(freq * 3 * yy),  # checks
        torch.sin(freq * 4 * (xx ** 2 + yy ** 2).sqrt() + phase),     # rings
        torch.sin(freq * 2 * (xx + yy) + phase),                # diagonal
        torch.sin(freq * 2 * (xx - yy) + phase),                # anti-diagonal
    ][:num_classes], 1)
    images = patterns[torch.arange(n), labels] + noise * torch.randn(n, img_size, img_size, generator=g)
    images = images.unsqueeze(1).expand(n, channels, img_size, img_size).contiguous()
    return TensorDataset(images.float(), labels)


def image_folder(root: str | Path, img_size: int, channels: int = 3):
    """A torchvision ImageFolder resized to ``img_size``."""
    from torchvision import datasets, transforms

    root = Path(root)
    if not root.is_dir():
        raise InputError(f"image folder {root} does not exist: pass a directory with one sub-folder per "
                         "class")
    tf = [transforms.Resize((img_size, img_size))]
    if channels == 1:
        tf.append(transforms.Grayscale())
    tf.append(transforms.ToTensor())
    return datasets.ImageFolder(str(root), transforms.Compose(tf))
