"""Readers of stacks and of the sums and means over a stacked axis: ``torch.stack(xs, d).sum(d)``,
``.mean(d)``, ``torch.sum(torch.stack(xs), dim=d)``: the same value as ``xs[0] + xs[1] + ...`` (divided by
``len(xs)`` for a mean)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from .binding import bind
from .targets import REDUCTIONS, STACK_TARGETS


@dataclass
class StackView:
    node: fx.Node
    tensors: list
    dim: int


def as_stack(node) -> StackView | None:
    """``torch.stack(list_of_nodes, dim)`` with a literal dim, else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in STACK_TARGETS):
        return None
    args = bind(node)
    if args is None:
        return None
    tensors, dim = args.get("tensors"), args.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or not tensors or not all(isinstance(t, fx.Node)
                                                                        for t in tensors):
        return None
    if not isinstance(dim, int) or isinstance(dim, bool):
        return None
    return StackView(node, list(tensors), dim)


@dataclass
class ReductionView:
    node: fx.Node
    kind: str          # "sum" | "mean"
    input: fx.Node
    dim: int


def as_reduction(node) -> ReductionView | None:
    """A sum or mean over exactly one literal dim, without ``keepdim`` or a ``dtype``, else None."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function" and node.target in REDUCTIONS:
        kind = REDUCTIONS[node.target]
    elif node.op == "call_method" and node.target in ("sum", "mean"):
        kind = node.target
    else:
        return None
    args = bind(node)
    if args is None or not isinstance(args.get("input"), fx.Node):
        return None
    dim = args.get("dim")
    if isinstance(dim, (list, tuple)) and len(dim) == 1:
        dim = dim[0]
    if (not isinstance(dim, int) or isinstance(dim, bool) or args.get("keepdim")
            or args.get("dtype") is not None):
        return None
    return ReductionView(node, kind, args["input"], dim)
