"""Readers of the ops that rearrange a tensor without computing: permutations of its axes (``transpose``,
``permute``) and reshapes (``reshape``, ``view``), in any spelling (function, method, varargs).

They let patterns move such ops across the ops they commute with (docs/identities.md §9): a Linear acts on
the last axis alone, so it commutes with any rearrangement of the leading axes, and an elementwise op commutes
with a permutation applied to all of its tensor operands.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from .binding import bind, input_of
from .readers import arith_kind, as_linear, as_sdpa
from .targets import is_op


def rank(node, depth: int = 0) -> int | None:
    """How many axes ``node``'s tensor has: from shape propagation (``tensor_meta``) or export (``val``), or
    through the permutes, Linears and arithmetic fxrep built after those ran; None where unknown."""
    if not isinstance(node, fx.Node) or depth > 64:
        return None
    meta = node.meta.get("tensor_meta")
    if hasattr(meta, "shape"):
        return len(meta.shape)
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor):
        return value.dim()
    p = _permute_args(node)
    if p is not None:
        return len(p[1]) if not p[2] else rank(p[0], depth + 1)
    lin = as_linear(node)
    if lin is not None:
        return rank(lin.input, depth + 1)
    reshaped = as_reshape(node)
    if reshaped is not None:
        return len(reshaped.shape)
    sdpa = as_sdpa(node)
    if sdpa is not None:
        return rank(sdpa.query, depth + 1)
    if is_op(node, "flatten", "unflatten"):
        return _flattened_rank(node, rank(input_of(node), depth + 1))
    if arith_kind(node) in ("add", "sub", "mul", "div") and not node.kwargs:
        ranks = [rank(a, depth + 1) if isinstance(a, fx.Node) else 0 for a in node.args]
        return None if None in ranks or not ranks else max(ranks)
    return None


def _flattened_rank(node, r: int | None) -> int | None:
    """The rank after ``flatten(start, end)`` or ``unflatten(dim, sizes)`` of a rank-``r`` input."""
    args = bind(node)
    if r is None or args is None:
        return None
    if "sizes" in args:
        sizes = args["sizes"]
        return r + len(sizes) - 1 if isinstance(sizes, (list, tuple)) else None
    start, end = args.get("start_dim", 0), args.get("end_dim", -1)
    if not all(isinstance(d, int) and -max(r, 1) <= d < max(r, 1) for d in (start, end)):
        return None
    return r - (end % max(r, 1) - start % max(r, 1)) if r else 1


@dataclass
class PermuteView:
    """``node`` is ``input.permute(perm)`` (``perm`` of non-negative axes, as long as the rank)."""

    node: fx.Node
    input: fx.Node
    perm: tuple

    @property
    def keeps_last_axis(self) -> bool:
        return self.perm[-1] == len(self.perm) - 1


def _permute_args(node):
    """(input, dims or (dim0, dim1), is_transpose) of a permute/transpose call, else None."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_method" and node.target == "permute":
        dims = node.args[1:]
        dims = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else tuple(dims)
        dims = tuple(node.kwargs.get("dims", dims))
        return (node.args[0], dims, False) if isinstance(node.args[0], fx.Node) else None
    if not is_op(node, "permute", "transpose", "swapaxes"):  # the permute method is read above
        return None
    args = bind(node)
    if args is None or not isinstance(args.get("input"), fx.Node):
        return None
    if "dims" in args:
        return args["input"], tuple(args["dims"]), False
    pair = (args.get("dim0", args.get("axis0")), args.get("dim1", args.get("axis1")))
    return args["input"], pair, True


def as_permute(node, rank_hint: int | None = None) -> PermuteView | None:
    """A transpose or permute with literal axes on a tensor of known rank (``rank_hint`` where the caller
    knows it otherwise), else None."""
    found = _permute_args(node)
    if found is None:
        return None
    x, dims, is_transpose = found
    r = next((r for r in (rank(x), rank(node), rank_hint) if r is not None), None)
    if r is None or not all(isinstance(d, int) and not isinstance(d, bool) and -r <= d < r for d in dims):
        return None
    dims = tuple(d % r for d in dims)
    if is_transpose:
        perm = list(range(r))
        perm[dims[0]], perm[dims[1]] = perm[dims[1]], perm[dims[0]]
        return PermuteView(node, x, tuple(perm))
    return PermuteView(node, x, dims) if sorted(dims) == list(range(r)) else None


@dataclass
class ReshapeView:
    """``node`` is ``input.reshape(shape)`` (or ``view``); sizes are ints or nodes (symbolic sizes)."""

    node: fx.Node
    input: fx.Node
    shape: tuple


def _size(s) -> bool:
    return isinstance(s, fx.Node) or (isinstance(s, int) and not isinstance(s, bool))


def as_reshape(node) -> ReshapeView | None:
    """``torch.reshape(x, shape)``, ``x.reshape(...)`` or ``x.view(...)`` with a shape (not a dtype), else
    None."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if node.op == "call_method" and node.target in ("reshape", "view") and not node.kwargs:
        shape = node.args[1:]
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (list, tuple)) else tuple(shape)
    elif node.op == "call_function" and is_op(node, "reshape"):
        args = bind(node)
        if args is None or not isinstance(args.get("shape"), (list, tuple)):
            return None
        shape = tuple(args["shape"])
    else:
        return None
    return ReshapeView(node, node.args[0], shape) if shape and all(_size(s) for s in shape) else None
