"""Row rules for torch-level graphs: how one op computes only some rows of its output.

``cuts(node, axis)`` answers, for the op ``node`` calls and a selection on its output axis ``axis``, which of
its inputs to cut to the selected rows and on which of their axes (``None``: read it whole). The rule is
found by the ``rows`` its op spec declares (``fxrep.ir.known_ops``), the same name the ATen rules of
``fxrep.export.rows.rules`` are found by: whether an op maps rows to rows is written once, in its spec. Each
graph level reads the op's arguments its own way; which input axis carries the selected one is the same
arithmetic on both (``unflatten_axis``, ``flatten_axis``, ``unsqueeze_axis``, ``reduction_axis``,
``narrow_axis``), written once here. A rows name without a rule here (``cat``, which has no torch-level
spelling fxrep reads) stops the selection.
"""

from __future__ import annotations

from torch import fx

from .ir import as_layer_norm, as_sdpa, as_softmax, bind, input_of
from .ir.effects import is_inplace
from .ir.layout import as_permute, as_reshape
from .ir.products import matmul_operands
from .ir.targets import spec_of


class Stop(Exception):
    """The op does not map rows to rows on the requested axis (or its shapes are unknown)."""


def shape_of(node) -> tuple | None:
    """The shape shape propagation recorded on ``node``, or None."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if hasattr(meta, "shape") else None


def is_int(v) -> bool:
    """A Python int (an axis or a bound), not a bool or a symbolic size."""
    return isinstance(v, int) and not isinstance(v, bool)


def cuts(node: fx.Node, axis: int) -> dict:
    """{input node: the axis to cut it on, or None to read it whole} for ``node`` computing the rows of
    output axis ``axis``; raises ``Stop`` where its op does not map rows to rows there."""
    spec = spec_of(node)
    rule = RULES.get(spec.rows) if spec is not None else None
    if rule is None:
        raise Stop
    return rule(node, axis, len(shape_of(node)))


def _operand_axis(node, operand, axis: int):
    """The axis of ``node``'s broadcast operand that carries output axis ``axis``, or None (read it whole)."""
    shape, out = shape_of(operand), shape_of(node)
    if shape is None or len(shape) > len(out):
        raise Stop  # a tensor operand of unknown shape, or not broadcast to the output
    a = axis - (len(out) - len(shape))
    if a < 0 or shape[a] == 1:
        return None
    if shape[a] != out[axis]:
        raise Stop  # not an operand broadcast to the output (``x.type_as(other)`` reads only a dtype)
    return a


def _single(node, x, x_axis, ok: bool) -> dict:
    """``x`` cut on ``x_axis``, every other input (weights) read whole."""
    if not ok or not isinstance(x, fx.Node):
        raise Stop
    return {a: (x_axis if a is x else None) for a in node.all_input_nodes}


def _bound_input(node):
    """(bound arguments, input, input's rank) of a call, or raises Stop."""
    args = bind(node)
    x = args.get("input") if args else None
    shape = shape_of(x) if isinstance(x, fx.Node) else None
    if not shape:  # unknown, or a 0-d tensor (no axis to select rows of)
        raise Stop
    return args, x, len(shape)


# --- which input axis carries output axis ``axis`` (None: no single one does) -------------------------------
# The arithmetic of the rules that move the axis, shared with the ATen rules (fxrep.export.rows.rules): each
# level reads the arguments its own way, the axes map the same.

def unflatten_axis(axis: int, dim: int, count: int) -> int | None:
    """``unflatten(dim, sizes)`` into ``count`` axes (``dim`` of the input, non-negative)."""
    if axis < dim:
        return axis
    return axis - count + 1 if axis >= dim + count else None


def flatten_axis(axis: int, first: int, last: int) -> int | None:
    """``flatten(first, last)`` (axes of the input, non-negative)."""
    if axis < first:
        return axis
    return axis + last - first if axis > first else None


def unsqueeze_axis(axis: int, dim: int) -> int | None:
    """``unsqueeze(dim)`` (an axis of the output, non-negative)."""
    if axis == dim:
        return None
    return axis if axis < dim else axis - 1


def reduction_axis(axis: int, in_rank: int, dims, keepdim: bool) -> int | None:
    """A reduction over ``dims`` of a rank-``in_rank`` input."""
    dims = {d % in_rank for d in dims}
    kept = list(range(in_rank)) if keepdim else [d for d in range(in_rank) if d not in dims]
    return kept[axis] if kept[axis] not in dims else None


def narrow_axis(axis: int, dim: int, keeps_every_row: bool) -> int | None:
    """A slice along ``dim`` (non-negative). A slice that keeps part of its axis is a selection itself, and
    two selections of different axes would swap places forever: it is moved through only by a selection of an
    earlier axis, so that they settle in axis order. One that keeps every row (as export writes ``x[:, 0]``:
    a whole slice of the batch axis, then a select) is not a selection."""
    return axis if axis != dim and (keeps_every_row or axis < dim) else None


# --- the rules, by the ``rows`` name of the op's spec ------------------------------------------------------

def _elementwise(node, axis, rank):
    """Each operand that has the axis with more than one row is cut; inputs without a tensor shape are Python
    values (sizes, scalars) and an operand of size 1 there is broadcast: read whole."""
    if is_inplace(node):
        raise Stop
    return {a: _operand_axis(node, a, axis) for a in node.all_input_nodes if shape_of(a) is not None}


def _linear(node, axis, rank):
    """Rows of any axis but the features' (the weight and bias are read whole, whatever they are)."""
    return _single(node, input_of(node), axis, axis != rank - 1)


def _layer_norm(node, axis, rank):
    """Rows of an axis before the normalized ones."""
    args, x, _ = _bound_input(node)
    normalized = args.get("normalized_shape")
    if isinstance(normalized, fx.Node):  # computed (``x.shape[-1:]``): the reader knows it from the affine
        ln = as_layer_norm(node)
        if ln is None:
            raise Stop
        normalized = ln.normalized_shape
    count = 1 if isinstance(normalized, int) else len(normalized)
    return _single(node, x, axis, axis < rank - count)


def _softmax(node, axis, rank):
    sm = as_softmax(node)
    if sm is None:
        raise Stop
    return _single(node, sm.input, axis, is_int(sm.dim) and axis != sm.dim % rank)


def _attention(node, axis, rank):
    """On the query axis the query and the mask's query rows are cut (keys and values read whole); on a
    batch or head axis every operand. Causal or dropout attention depends on where the rows sit: stop."""
    sdpa = as_sdpa(node)
    if sdpa is None or sdpa.is_causal is not False or sdpa.dropout_p not in (0, 0.0) or \
            sdpa.enable_gqa is not False or axis == rank - 1:
        raise Stop
    found = {n: None for n in sdpa.node.all_input_nodes}
    found[sdpa.query] = axis
    if axis < rank - 2:  # a batch or head axis: every operand's
        for n in (sdpa.key, sdpa.value):
            found[n] = _operand_axis(node, n, axis)
    if isinstance(sdpa.attn_mask, fx.Node):
        found[sdpa.attn_mask] = _operand_axis(node, sdpa.attn_mask, axis)
    return found


def _matmul(node, axis, rank):
    """Rows (axis -2) of ``a @ b`` are those rows of ``a``, where ``a`` has the output's rank."""
    operands = matmul_operands(node)
    if operands is None:
        raise Stop
    a = operands[0]
    return _single(node, a, axis, axis == rank - 2 and len(shape_of(a) or ()) == rank)


def _permute(node, axis, rank):
    permute = as_permute(node)
    if permute is None:
        raise Stop
    return _single(node, permute.input, permute.perm[axis], True)


def _view(node, axis, rank):
    """A reshape that keeps the axis and everything before it as they were, with a literal size there (the
    rebuilt call takes the selected count)."""
    view = as_reshape(node)
    if view is None:
        raise Stop
    before, after = shape_of(view.input), shape_of(node)
    if before is None or before[:axis + 1] != after[:axis + 1] or len(view.shape) != len(after) or \
            isinstance(view.shape[axis], fx.Node):
        raise Stop  # the rows' axis is merged or split, or its size is computed
    return _single(node, view.input, axis, True)


def _moved(node, x, own) -> dict:
    """``x`` cut on ``own``, the axis an ``*_axis`` function above found (None: stop)."""
    return _single(node, x, own, own is not None)


def _unflatten(node, axis, rank):
    args, x, in_rank = _bound_input(node)
    return _moved(node, x, unflatten_axis(axis, args["dim"] % in_rank, len(args["sizes"])))


def _flatten(node, axis, rank):
    args, x, in_rank = _bound_input(node)
    first, last = args.get("start_dim", 0) % in_rank, args.get("end_dim", -1) % in_rank
    return _moved(node, x, flatten_axis(axis, first, last))


def _unsqueeze(node, axis, rank):
    args, x, _ = _bound_input(node)
    return _moved(node, x, unsqueeze_axis(axis, args["dim"] % rank))


def _narrow(node, axis, rank):
    """A slice (``narrow``, ``aten.slice``) of another axis: the same slice of the selected rows."""
    args, x, _ = _bound_input(node)
    dim = args.get("dim", 0)
    if not is_int(dim):
        raise Stop
    dim %= rank
    return _moved(node, x, narrow_axis(axis, dim, shape_of(node)[dim] == shape_of(x)[dim]))


def _reduction(node, axis, rank):
    """``sum``/``mean`` over other axes (the rank-aware attention sums its heads)."""
    args, x, in_rank = _bound_input(node)
    dims = args.get("dim")
    if dims is None or args.get("dtype") is not None:
        raise Stop  # a reduction over every axis
    dims = dims if isinstance(dims, (list, tuple)) else (dims,)
    return _moved(node, x, reduction_axis(axis, in_rank, dims, bool(args.get("keepdim"))))


def _dropout(node, axis, rank):
    """Dropout that drops nothing (not training, or p = 0) is the identity; one that draws stays."""
    args, x, _ = _bound_input(node)
    if args.get("inplace") or (args.get("training", args.get("train")) and args.get("p")):
        raise Stop
    return _single(node, x, axis, True)


#: rows name (``OpSpec.rows``) -> the rule for torch-level graphs
RULES = {
    "elementwise": _elementwise, "linear": _linear, "layer_norm": _layer_norm, "softmax": _softmax,
    "attention": _attention, "matmul": _matmul, "permute": _permute, "transpose": _permute, "view": _view,
    "unflatten": _unflatten, "flatten": _flatten, "unsqueeze": _unsqueeze, "narrow": _narrow,
    "reduction": _reduction, "dropout": _dropout,
}
