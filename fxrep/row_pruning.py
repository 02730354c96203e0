"""Rows nobody reads, in a torch-level graph: the GraphModule ``fxrep.fuse`` returns.

The same rewrite as ``fxrep.export.rows`` (which works on the ATen graphs ``torch.export`` writes), on the ops
a traced and fused model is made of: a row selection (``x[:, 0]``, ``x[:, a:b]``, ``select``, ``narrow``)
moves up through every op that maps rows to rows on that axis, and the op is computed on the selected rows of
its inputs (``narrow`` views). How each op maps rows is its rule in ``fxrep.row_rules``, found by the
``rows`` its op spec declares:

- elementwise ops (arithmetic with broadcasting, activations, casts): each operand that has the axis with
  more than one row is cut; an operand of size 1 there (or without the axis) is read whole;
- Linear (not the last axis), LayerNorm (not a normalized axis), softmax over another axis, ``a @ b`` (the
  rows of ``a``), a slice of another axis, ``sum``/``mean`` over other axes, dropout that drops nothing: the
  input is cut;
- ``F.scaled_dot_product_attention``: on the query axis the query and the mask's query rows are cut (keys and
  values are read whole); on a batch or head axis every operand is cut; causal or dropout attention stops;
- ``transpose``/``permute``, ``unsqueeze``, ``unflatten``/``flatten``, ``reshape``/``view`` move the axis
  where it stays one axis (a view's literal row count becomes the selected count).

Anything else (a Linear over the token axis, a reduction over the rows, a split read by others) keeps the
selection where it is. Shapes come from shape propagation on the example inputs, which is rerun after each
pass.
"""

from __future__ import annotations

import operator

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from .engine import run_upward
from .equivalence import compare_outputs
from .errors import InternalError
from .ir import bind, input_of
from .ir.layout import as_reshape
from .ir.readers import is_call
from .ir.targets import is_op
from .pattern import Match
from .report import Applied
from .row_rules import Stop, cuts, is_int, shape_of

aten = torch.ops.aten


# --- which rows a node asks for -----------------------------------------------------------------------------

def row_request(node: fx.Node):
    """``(source, axis, start, stop, squeeze)`` when ``node`` selects rows ``start:stop`` of one axis of
    ``source`` (``squeeze``: the axis is dropped, as ``x[:, 0]`` and ``select`` do); else None."""
    source = input_of(node) if node.op in ("call_function", "call_method") else None
    shape = shape_of(source)
    if shape is None:
        return None
    if node.op == "call_function" and node.target is operator.getitem:
        return _indexing(source, shape, node.args[1])
    if is_op(node, "select") or is_call(node, {aten.select.int}):
        args = bind(node)
        if args is None or not is_int(args.get("dim")) or not is_int(args.get("index")):
            return None
        axis = args["dim"] % len(shape)
        index = args["index"] % shape[axis]
        return _bounded(source, shape, axis, index, index + 1, True)
    if node.op == "call_function" and node.target is aten.slice.Tensor:  # as torch.export writes x[:, a:b]
        found = _aten_slice(node, shape)
        if found is None:
            return None
        axis, start, stop = found
        return _bounded(source, shape, axis, start, stop, False)
    if is_op(node, "narrow"):
        args = bind(node)
        if args is None or not all(is_int(args.get(k)) for k in ("dim", "start", "length")):
            return None
        axis = args["dim"] % len(shape)
        start = args["start"] % shape[axis]
        return _bounded(source, shape, axis, start, start + args["length"], False)
    return None


def _indexing(source, shape, index):
    """``source[index]`` where ``index`` is full slices but one entry (an int or a step-1 slice)."""
    index = index if isinstance(index, tuple) else (index,)
    if len(index) > len(shape) or not index:
        return None
    picked = [(i, e) for i, e in enumerate(index) if e != slice(None)]
    if len(picked) != 1 or any(not isinstance(e, (slice, int)) or isinstance(e, bool) for e in index):
        return None
    axis, entry = picked[0]
    if is_int(entry):
        i = entry % shape[axis]
        return _bounded(source, shape, axis, i, i + 1, True)
    if entry.step not in (None, 1) or not all(b is None or is_int(b) for b in (entry.start, entry.stop)):
        return None
    start, stop, _ = entry.indices(shape[axis])
    return _bounded(source, shape, axis, start, stop, False)


def _aten_slice(node, shape):
    """(axis, start, stop) of ``aten.slice.Tensor(x, dim, start, end, step)`` with step 1, else None."""
    a = bind(node)
    if a is None:
        return None
    axis, start, stop, step = a.get("dim", 0), a.get("start"), a.get("end"), a.get("step", 1)
    if not is_int(axis) or step != 1 or not all(b is None or is_int(b) for b in (start, stop)):
        return None
    axis %= len(shape)
    return (axis, *slice(start, stop).indices(shape[axis])[:2])


def _bounded(source, shape, axis, start, stop, squeeze):
    if stop <= start or (start, stop) == (0, shape[axis]) or stop > shape[axis]:
        return None  # nothing to cut (or nothing at all)
    return source, axis, start, stop, squeeze


def _reads_shape_only(user: fx.Node, node: fx.Node) -> bool:
    """``x.expand_as(node)`` (the rank-aware attention's key): reads only ``node``'s shape."""
    return user.op == "call_method" and user.target == "expand_as" and len(user.args) == 2 and \
        user.args[1] is node and user.args[0] is not node and not user.kwargs


def _expand_sizes(user: fx.Node) -> list | None:
    """The sizes to write ``x.expand_as(node)`` as ``x.expand(sizes)`` with (-1 where ``x`` has the size
    already, so a dynamic batch stays dynamic); None where a size differs and is not static."""
    source, target = shape_of(user.args[0]), shape_of(user.args[1])
    if source is None or target is None or len(source) != len(target):
        return None
    return [-1 if s == t else t for s, t in zip(source, target)]


def shared_request(node: fx.Node, request_of=None, reads_shape_only=None):
    """``(axis, start, stop)`` when every reader of ``node`` asks for the same rows of it (or reads only its
    shape); else None. ``request_of(user)`` reads a reader's request (``(source, axis, start, stop, ...)`` or
    None) and ``reads_shape_only(user, node)`` tells shape readers, for this graph's spellings: torch-level
    by default, ATen in ``fxrep.export.rows``."""
    request_of, reads_shape_only = request_of or row_request, reads_shape_only or _reads_shape_only
    keys = set()
    for user in node.users:
        if reads_shape_only(user, node):
            continue
        request = request_of(user)
        if request is None or request[0] is not node:
            return None
        keys.add(tuple(request[1:4]))
    return keys.pop() if len(keys) == 1 else None


def _rebuilt(graph: fx.Graph, node: fx.Node, cut: dict, axis: int, start: int, stop: int) -> fx.Node:
    """``node``'s op on its inputs cut to rows ``start:stop`` (before ``node``)."""
    narrowed = {}
    with graph.inserting_before(node):
        for x, x_axis in cut.items():
            if x_axis is not None:
                narrowed[x] = graph.call_function(torch.narrow, (x, x_axis, start, stop - start))
        new = graph.node_copy(node, lambda n: narrowed.get(n, n))
        new.meta.pop("tensor_meta", None)  # its shape has fewer rows: propagated again before the next pass
        view = as_reshape(node)
        if view is not None:  # the view's literal row count is the selected count now (checked by its rule)
            shape = list(view.shape)
            if shape[axis] != -1:
                shape[axis] = stop - start
            new.args, new.kwargs = (input_of(new), tuple(shape)), {}
    return new


class MoveRowSelectionUp:
    """The row move as a pattern: where every reader of a node asks for the same rows of it (or reads only its
    shape), the node computed on those rows of its inputs replaces the readers, and the requests move to the
    inputs (the rules: ``fxrep.row_rules``). Run from the outputs up (``engine.run_upward``)."""

    name, phase = "prune_unread_rows", "rows"

    def match(self, node, ctx):
        if node.op not in ("call_function", "call_method") or not node.users or shape_of(node) is None:
            return None
        request = shared_request(node)
        if request is None:
            return None
        shape_readers = [u for u in node.users if _reads_shape_only(u, node)]
        sizes = [_expand_sizes(u) for u in shape_readers]
        if None in sizes:
            return None
        try:
            cut = cuts(node, request[0])
        except Stop:
            return None
        reads = _flat_args(node)
        if any(x_axis is not None and sum(a is x for a in reads) > 1 for x, x_axis in cut.items()):
            return None  # an input read twice, once cut and once whole: node_copy would cut both
        return Match((node, *node.users), (request, cut, list(zip(shape_readers, sizes))),
                     f"{node.target} on rows {request[1]}:{request[2]} of axis {request[0]}")

    def replace(self, match, ctx):
        node, (request, cut, shape_readers) = match.nodes[0], match.data
        graph, (axis, start, stop) = ctx.graph, request
        new = _rebuilt(graph, node, cut, axis, start, stop)
        for user, size in shape_readers:
            with graph.inserting_before(user):
                ctx.replace_node(user, graph.call_method("expand", (input_of(user), *size)))
        for user in match.nodes[1:]:
            if any(user is r for r, _ in shape_readers):
                continue
            if row_request(user)[4]:  # x[:, i] or select: the axis goes
                with graph.inserting_before(user):
                    ctx.replace_node(user, graph.call_function(torch.select, (new, axis, 0)))
            else:
                ctx.replace_node(user, new)
        ctx.remove(node)


def _flat_args(node: fx.Node) -> list:
    out: list = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: out.append(n) or n)
    return out


def move_row_selections_up(gm: fx.GraphModule, example_inputs: tuple) -> int:
    """Move every row selection in ``gm`` up through the ops that map rows to rows, as far as it goes; returns
    how many ops now compute fewer rows. Shapes are propagated from ``example_inputs`` before each pass
    (``engine.run_upward``: linear in graph size)."""
    report = run_upward(gm, (MoveRowSelectionUp(),), "rows",
                        before_pass=lambda g: ShapeProp(g).propagate(*example_inputs))
    gm.recompile()
    return len(report.applied)


def prune_unread_rows(gm: fx.GraphModule, example_inputs: tuple, report=None) -> int:
    """Rewrite fxrep's own ``gm`` in place to compute only the rows its outputs read (see the module
    docstring); returns how many ops now compute fewer rows. The result is checked against ``gm`` as it was,
    on ``example_inputs`` (``numerics.MODEL_RTOL`` for the outputs' dtype); a difference raises
    InternalError."""
    with torch.no_grad():
        try:
            before = gm(*example_inputs)
        except Exception:  # noqa: BLE001 - a fused graph that does not run is reported by the engine
            return 0
        moved = move_row_selections_up(gm, example_inputs)
        if moved:
            try:
                compare_outputs(before, gm(*example_inputs))
            except Exception as e:  # noqa: BLE001 - a graph fxrep built that computes something else
                raise InternalError(f"computing only the rows the outputs read broke the graph "
                                    f"({type(e).__name__}: {str(e).splitlines()[0][:300]}). This is a bug in "
                                    "fxrep; please report it with the model, and pass prune_rows=False "
                                    "meanwhile.") from e
    if moved and report is not None:
        report.applied.append(Applied("prune_unread_rows", f"{moved} ops compute only the rows their outputs "
                                      "read (prune_rows=False: every row)", ()))
    return moved
