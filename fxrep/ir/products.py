"""Matrix products (``@``, ``torch.matmul``, ``bmm``, the attention einsums) and their operands, however the
arguments are passed."""

from __future__ import annotations

import torch
from torch import fx

from .binding import bind
from .targets import is_op


def matmul_operands(node) -> tuple | None:
    """``(a, b)`` of a matrix product ``a @ b`` in any spelling (``torch.matmul``, ``torch.bmm``, the
    operator, the methods), however its arguments are passed; else None."""
    if not (isinstance(node, fx.Node) and is_matmul(node)):
        return None
    args = bind(node) or {}
    found = [args[k] for k in ("input", "a", "other", "mat2", "b") if k in args]
    return tuple(found) if len(found) == 2 else None


def einsum_operands(node) -> tuple | None:
    """The two operands of an einsum ``einsum_kind`` names (its operands are positional by signature)."""
    return tuple(node.args[1:3]) if einsum_kind(node) is not None else None


def is_matmul(node: fx.Node) -> bool:
    return is_op(node, "matmul")


def einsum_kind(node: fx.Node) -> str | None:
    """'logits' for ``einsum('bhqd,bhkd->bhqk', q, k)``, 'pv' for ``einsum('bhqk,bhkd->bhqd', p, v)`` (any
    letters), else None."""
    if not (node.op == "call_function" and node.target is torch.einsum and len(node.args) == 3
            and isinstance(node.args[0], str)):
        return None
    eq = node.args[0].replace(" ", "")
    if "->" not in eq or "." in eq:
        return None
    lhs, out = eq.split("->")
    ops = lhs.split(",")
    if len(ops) != 2 or not all(len(t) == 4 for t in (*ops, out)):
        return None
    (a, b), o = ops, out
    if len(set(a)) != 4 or len(set(b)) != 4 or a[:2] != b[:2] or o[:2] != a[:2]:
        return None
    if a[3] == b[3] and a[2] != b[2] and o[2:] == a[2] + b[2]:
        return "logits"
    if a[3] == b[2] and o[2:] == a[2] + b[3] and a[3] not in o:
        return "pv"
    return None
