"""Rows nobody reads: compute only the token rows a program's outputs read.

A ViT classifier reads one row of its last block's output, the class token (timm: ``x[:, 0]``). Everything
after the last block's attention keys and values works token by token (Linear, LayerNorm, GELU, residual
adds, each attention query row), so that block needs the other 196 rows for its keys and values only. This
rewrite moves the row selection up the graph, through every op that maps rows to rows, until it meets a
tensor that something else reads whole:

    select(layer_norm(add(x, mlp(x))), 1, 0)  ->  squeeze(layer_norm(add(x[:, 0:1], mlp(x[:, 0:1]))), 1)
    sdpa(q, k, v)[:, :, 0:1]                   ->  sdpa(q[:, :, 0:1], k, v)

It is exact: each moved op computes the same numbers on fewer rows (up to a GEMM's rounding for a different
row count). Where an op is not known to be row-wise on the selected axis, the selection stays where it is. In
a fused d3b4 the last of three blocks is a third of the work; in DeiT-Tiny-12 the last of twelve is a twelfth.

The rewrite works on ATen graphs as ``torch.export`` writes them (shapes from ``meta["val"]``):
``prune_unread_rows`` takes and returns an ExportedProgram.
"""


from __future__ import annotations

import torch
from torch import fx

from ...engine import run_upward
from ...ir import input_of
from ...ir.recorded import recorded_shape, same_size
from ...pattern import Match
from ...program import export_rewritten
from .rules import ELEMENTWISE, RULES, _Plan, _reads_shape_only, _shared_request, _Stop, row_request

aten = torch.ops.aten


def prune_unread_rows(program: torch.export.ExportedProgram, example_inputs: tuple) -> \
        torch.export.ExportedProgram:
    """A new program that computes only the rows its outputs read (see the module docstring); ``program`` is
    not modified, and one with nothing to prune is returned as it is. The result is checked against
    ``program`` on ``example_inputs`` (``numerics.MODEL_RTOL`` for its dtype); a difference raises
    InternalError."""
    module = program.module()
    if not move_row_selections_up(module.graph):
        return program
    module.recompile()
    return export_rewritten(program, module, example_inputs,
                            rewrite="computing only the rows the outputs read", switch="prune_rows=False")


def _shape_reader_sizes(node: fx.Node) -> list | None:
    """``[(expand_as(x, node), sizes)]``: the sizes to write each shape-only reader of ``node`` with
    (``expand(x, sizes)``), so that ``node`` can go; None where a size is symbolic and not ``x``'s own."""
    plans = []
    for user in [u for u in node.users if _reads_shape_only(u, node)]:
        source, target = recorded_shape(input_of(user)), recorded_shape(node)
        if source is None or target is None or len(source) > len(target):
            return None
        source = (None,) * (len(target) - len(source)) + tuple(source)
        sizes = [t if isinstance(t, int) else -1 if s is not None and same_size(s, t) else None
                 for s, t in zip(source, target)]
        if None in sizes:
            return None
        plans.append((user, sizes))
    return plans


class MoveRowSelectionUp:
    """The row move as a pattern: where every reader of a node asks for the same rows of it (or reads only its
    shape), the node's op computed on those rows of its inputs (``RULES``) replaces the readers; the requests
    move to the inputs. Run from the outputs up (``engine.run_upward``)."""

    name, phase = "prune_unread_rows", "rows"

    def match(self, node, ctx):
        request = _shared_request(node) if node.op == "call_function" and node.users else None
        rule = RULES.get(node.target) if request is not None else None
        if rule is None or recorded_shape(node) is None:
            return None
        shape_readers = _shape_reader_sizes(node)
        if shape_readers is None:
            return None
        plan = _Plan()
        try:
            result = rule(plan, node, *request)
        except _Stop:
            return None
        if result is None:
            return None
        return Match((node, *node.users), (plan, result, shape_readers, request[0]),
                     f"{node.target} on rows {request[1]}:{request[2]} of axis {request[0]}")

    def replace(self, match, ctx):
        node, (plan, result, shape_readers, axis) = match.nodes[0], match.data
        graph = ctx.graph
        new = plan.build(graph, node, result, ctx.resolve)
        for user, sizes in shape_readers:
            with graph.inserting_before(user):
                expanded = graph.call_function(aten.expand.default, (input_of(user), sizes))
            expanded.meta.update(user.meta)
            ctx.replace_node(user, expanded)
        selections = [u for u in match.nodes[1:] if all(u is not r for r, _ in shape_readers)]
        for user in selections:
            if user.target is aten.select.int:
                with graph.inserting_before(user):
                    new_user = graph.call_function(aten.squeeze.dims, (new, [axis]))
            else:
                new_user = new
            ctx.replace_node(user, new_user)
        ctx.remove(node)


def move_row_selections_up(graph: fx.Graph) -> bool:
    """Move every row selection (``slice``/``select`` on a static axis) up through the ops that map rows to
    rows, as far as it goes; returns whether the graph changed. New nodes carry no ``meta["val"]``: export the
    module again before reading shapes (``prune_unread_rows`` does). Linear in graph size
    (``engine.run_upward``)."""
    return bool(run_upward(graph.owning_module, (MoveRowSelectionUp(),), "rows").applied)


__all__ = ["prune_unread_rows", "move_row_selections_up", "row_request", "RULES", "ELEMENTWISE"]
