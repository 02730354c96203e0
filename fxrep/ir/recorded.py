"""Shapes ``torch.export`` recorded on a node (``meta["val"]``), whose sizes may be symbolic: read, and
compared only where they are provably equal."""

from __future__ import annotations

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true


def recorded_shape(node) -> tuple | None:
    """The shape export recorded for ``node`` (``meta["val"]``; sizes may be symbolic), or None."""
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def same_size(a, b) -> bool:
    """Whether two recorded sizes (ints or symbolic) are provably equal."""
    return a is b or statically_known_true(a == b)


def same_shape(a, b) -> bool:
    """Whether two recorded shapes are known and provably equal, size by size."""
    return a is not None and b is not None and len(a) == len(b) and \
        all(statically_known_true(x == y) for x, y in zip(a, b))
