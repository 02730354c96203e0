"""Row rules: which rows a node asks for, and how one op computes only some rows of its output.

``RULES`` maps an ATen op to a function ``(plan, node, axis, start, stop)`` that plans the op on the requested
rows of its inputs (``_Plan``: recorded, built only when the move is made) and returns the planned node, or
None / raises ``_Stop`` where the op does not map rows to rows on that axis. ``fxrep.export.rows`` moves the
requests through them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from ...ir import bind, input_of
from ...ir.known_ops import OPS
from ...ir.recorded import recorded_shape, same_size
from ...row_pruning import shared_request
from ...row_rules import flatten_axis, narrow_axis, reduction_axis, unflatten_axis, unsqueeze_axis

aten = torch.ops.aten


class _Stop(Exception):
    """An operand the rule cannot cut: the request stays where it is."""


# --- which rows a node asks for ----------------------------------------------------------------------------

def _static_size(node, axis: int):
    shape = recorded_shape(node)
    return shape[axis] if shape is not None and isinstance(shape[axis], int) else None


def row_request(node: fx.Node):
    """``(source, axis, start, stop)`` when ``node`` selects rows ``start:stop`` of one static axis of
    ``source`` (``slice`` with step 1, or ``select``), with the bounds normalized; else None. A slice of the
    whole axis asks for nothing."""
    if node.op != "call_function" or node.target not in (aten.slice.Tensor, aten.select.int):
        return None
    a = bind(node)
    source = a["input"]
    shape = recorded_shape(source) if isinstance(source, fx.Node) else None
    if shape is None:
        return None
    if node.target is aten.select.int:
        axis, index = a["dim"] % len(shape), a["index"]
        size = _static_size(source, axis)
        if size is None or not isinstance(index, int):
            return None
        index %= size
        return source, axis, index, index + 1
    axis, start, stop, step = a["dim"] % len(shape), a["start"], a["end"], a["step"]
    size = _static_size(source, axis)
    if size is None or step != 1 or not all(isinstance(b, int) or b is None for b in (start, stop)):
        return None
    start, stop = slice(start, stop).indices(size)[:2]
    if stop <= start or (start, stop) == (0, size):
        return None
    return source, axis, start, stop


def _reads_shape_only(user: fx.Node, node: fx.Node) -> bool:
    """``expand_as(x, node)``: reads only ``node``'s shape."""
    if user.target is not aten.expand_as.default:
        return False
    a = bind(user)
    return a["other"] is node and a["input"] is not node


def _shared_request(node: fx.Node):
    """``(axis, start, stop)`` when every reader of ``node`` asks for the same rows of it (or reads its shape
    only); else None."""
    return shared_request(node, row_request, _reads_shape_only)


# --- moving a request through one op ----------------------------------------------------------------------

@dataclass(frozen=True)
class _Planned:
    """A node a rule asked for, not built yet: its index in the plan."""

    index: int


class _Plan:
    """What a rule would build before its node: slices of the node's inputs and the op on them, recorded in
    order (``calls``) and built by ``build`` when the move is made, so that matching a move never mutates the
    graph."""

    def __init__(self):
        self.calls: list = []

    def rows(self, node, axis: int, start: int, stop: int):
        return self.call(aten.slice.Tensor, (node, axis, start, stop))

    def call(self, target, args, kwargs=None) -> _Planned:
        self.calls.append((target, tuple(args), dict(kwargs or {})))
        return _Planned(len(self.calls) - 1)

    def build(self, graph: fx.Graph, anchor: fx.Node, result, resolve) -> fx.Node:
        """Build the recorded calls before ``anchor`` (reading ``resolve(n)`` for each graph node ``n``);
        return the node ``result`` names."""
        made: list = []

        def value(a):
            if isinstance(a, _Planned):
                return made[a.index]
            return resolve(a) if isinstance(a, fx.Node) else a

        for target, args, kwargs in self.calls:
            with graph.inserting_before(anchor):
                made.append(graph.call_function(target, fx.node.map_aggregate(args, value),
                                                fx.node.map_aggregate(kwargs, value)))
        return value(result)


def _same_call_on_rows(b: _Plan, node: fx.Node, axis: int, start: int, stop: int) -> _Planned:
    """``node``'s call, the same arguments, on rows ``start:stop`` of its input's axis ``axis``."""
    return b.call(node.target, [b.rows(input_of(node), axis, start, stop), *node.args[1:]], node.kwargs)


def _elementwise(b: _Plan, node: fx.Node, axis: int, start: int, stop: int):
    rank, size = len(recorded_shape(node)), recorded_shape(node)[axis]

    def cut(arg):
        shape = recorded_shape(arg) if isinstance(arg, fx.Node) else None
        if not isinstance(arg, fx.Node):
            return arg
        if shape is None or len(shape) > rank:
            raise _Stop
        own = axis - (rank - len(shape))
        if own < 0 or shape[own] == 1:  # broadcast along the axis: read whole
            return arg
        if not same_size(shape[own], size):
            raise _Stop
        return b.rows(arg, own, start, stop)

    return b.call(node.target, [cut(a) for a in node.args], {k: cut(v) for k, v in node.kwargs.items()})


def _dropout(b: _Plan, node: fx.Node, axis: int, start: int, stop: int):
    """Dropout that drops nothing (eval mode, or p = 0) is the identity; one that draws is left alone."""
    a = bind(node)
    if a["train"] and a["p"]:
        return None
    return _elementwise(b, node, axis, start, stop)


def _last_axis_untouched(b: _Plan, node: fx.Node, axis: int, start: int, stop: int, keep: int = 1):
    """Ops that work along the last ``keep`` axes only (Linear, LayerNorm): cut the first argument."""
    if axis >= len(recorded_shape(node)) - keep:
        return None
    return _same_call_on_rows(b, node, axis, start, stop)


def _linear(b, node, axis, start, stop):
    return _last_axis_untouched(b, node, axis, start, stop)


def _layer_norm(b, node, axis, start, stop):
    return _last_axis_untouched(b, node, axis, start, stop, keep=len(bind(node)["normalized_shape"]))


def _softmax(b, node, axis, start, stop):
    if bind(node)["dim"] % len(recorded_shape(node)) == axis:
        return None
    return _same_call_on_rows(b, node, axis, start, stop)


def _matmul(b, node, axis, start, stop):
    """Rows (axis -2) of ``A @ B`` are those rows of ``A``; ``A`` has the output's rank (``bmm``)."""
    rank = len(recorded_shape(node))
    if axis != rank - 2 or len(recorded_shape(input_of(node)) or ()) != rank:
        return None
    return _same_call_on_rows(b, node, axis, start, stop)


def _attention(b, node, axis, start, stop):
    """Query rows of ``scaled_dot_product_attention``: cut the query and the mask's query axis, keep keys and
    values. A causal mask depends on where the rows sit, and dropout draws per row, so those calls stay."""
    rank, a = len(recorded_shape(node)), bind(node)
    if axis != rank - 2 or a["is_causal"] or a["dropout_p"] or len(recorded_shape(a["query"]) or ()) != rank:
        return None
    a["query"] = b.rows(a["query"], axis, start, stop)
    mask = a["attn_mask"]
    if isinstance(mask, fx.Node):
        shape = recorded_shape(mask)
        if shape is None or len(shape) < 2:
            return None
        if shape[-2] != 1:
            a["attn_mask"] = b.rows(mask, len(shape) - 2, start, stop)
    query, key, value = a.pop("query"), a.pop("key"), a.pop("value")
    return b.call(node.target, [query, key, value], a)


def _transpose(b, node, axis, start, stop):
    rank, a = len(recorded_shape(node)), bind(node)
    i, j = a["dim0"] % rank, a["dim1"] % rank
    own = j if axis == i else i if axis == j else axis
    return _same_call_on_rows(b, node, own, start, stop)


def _permute(b, node, axis, start, stop):
    order = [d % len(recorded_shape(node)) for d in bind(node)["dims"]]
    return _same_call_on_rows(b, node, order[axis], start, stop)


def _moved(b, node, own, start, stop):
    """``node``'s call on rows ``start:stop`` of its input's axis ``own`` (None: the request stays)."""
    return None if own is None else _same_call_on_rows(b, node, own, start, stop)


def _unflatten(b, node, axis, start, stop):
    a = bind(node)
    dim = a["dim"] % len(recorded_shape(a["input"]))
    return _moved(b, node, unflatten_axis(axis, dim, len(a["sizes"])), start, stop)


def _unsqueeze(b, node, axis, start, stop):
    dim = bind(node)["dim"] % len(recorded_shape(node))
    return _moved(b, node, unsqueeze_axis(axis, dim), start, stop)


def _view(b, node, axis, start, stop):
    """A view that keeps the selected axis and everything before it (or everything from it on) as they were:
    the same view of the selected rows, with that one size changed."""
    a = bind(node)
    out, source = recorded_shape(node), recorded_shape(a["input"])
    sizes = list(a["size"] if "size" in a else a["shape"])
    if len(sizes) != len(out):
        return None
    if len(source) > axis and all(same_size(p, q) for p, q in zip(out[:axis + 1], source[:axis + 1])):
        own = axis
    elif (all(same_size(p, q) for p, q in zip(out[axis:][::-1], source[::-1]))
          and len(source) >= len(out) - axis):
        own = len(source) - (len(out) - axis)
    else:
        return None
    sizes[axis] = stop - start
    # reshape, not view: the selected rows of a batch are not contiguous
    return b.call(aten.reshape.default, [b.rows(a["input"], own, start, stop), sizes])


def _flatten(b, node, axis, start, stop):
    """Axes before the flattened ones keep their place; those after it move up by the flattened count."""
    a = bind(node)
    in_rank = len(recorded_shape(a["input"]))
    if not in_rank:
        return None
    first, last = a["start_dim"] % in_rank, a["end_dim"] % in_rank
    return _moved(b, node, flatten_axis(axis, first, last), start, stop)


def _narrow(b, node, axis, start, stop):
    """A slice of another axis: the same slice of the selected rows (``row_rules.narrow_axis``: which)."""
    a = bind(node)
    dim = a["dim"] % len(recorded_shape(node))
    keeps_every_row = same_size(recorded_shape(node)[dim], recorded_shape(a["input"])[dim])
    return _moved(b, node, narrow_axis(axis, dim, keeps_every_row), start, stop)


def _reduction(b, node, axis, start, stop):
    """``sum``/``mean`` over other axes: the same reduction of the selected rows."""
    a = bind(node)
    if not a["dim"]:  # all axes
        return None
    own = reduction_axis(axis, len(recorded_shape(a["input"])), a["dim"], a["keepdim"])
    return _moved(b, node, own, start, stop)


def _cat(b, node, axis, start, stop):
    """Rows of a concatenation: along another axis, the same rows of every part; along its own axis, a part
    that holds them all (timm's class token in front of the patches)."""
    a = bind(node)
    parts, dim = a["tensors"], a["dim"] % len(recorded_shape(node))
    if axis != dim:
        return b.call(node.target, [[b.rows(p, axis, start, stop) for p in parts], a["dim"]])
    offset = 0
    for part in parts:
        size = _static_size(part, axis)
        if size is None:
            return None
        if offset <= start and stop <= offset + size:
            return b.rows(part, axis, start - offset, stop - offset) if (start - offset, stop - offset) != \
                (0, size) else part
        offset += size
    return None


_RULES_BY_NAME = {
    "linear": _linear, "layer_norm": _layer_norm, "softmax": _softmax, "matmul": _matmul,
    "attention": _attention, "transpose": _transpose, "permute": _permute, "unflatten": _unflatten,
    "unsqueeze": _unsqueeze, "reduction": _reduction, "cat": _cat, "dropout": _dropout, "view": _view,
    "flatten": _flatten, "narrow": _narrow, "elementwise": _elementwise,
}

#: ATen overload -> its row rule, for every overload of an op spec that names one (``OpSpec.rows``)
RULES = {op: _RULES_BY_NAME[spec.rows] for spec in OPS if spec.rows is not None for op in spec.aten}
#: the ATen overloads of elementwise ops: a row of the output is computed from the same row of every operand
#: that has that axis (an operand of size 1 there is read whole)
ELEMENTWISE = frozenset(op for spec in OPS if spec.elementwise for op in spec.aten)
