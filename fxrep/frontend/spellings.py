"""ATen spellings (``torch.export`` graphs) rewritten to the torch-level spellings the readers know.

A graph from ``torch.export`` (``ExportedProgram.module()``) calls ATen overloads: ``aten.linear.default``,
``aten.layer_norm.default``, ``aten.softmax.int``, ``aten.view.default``. Each has one torch-level spelling
with the same meaning and, up to names, the same arguments. The front-end pattern ``ATEN_TO_TORCH`` replaces
every overload of ``TABLE`` by that spelling (arguments bound on the overload's schema), so one pattern sees
one spelling whatever captured the graph. A core ATen graph (``run_decompositions()``) has its Linear, batched
matmul and LayerNorm decompositions folded back first (``core_aten``). Overloads not in the table stay as
they are: the readers treat them as opaque ops, exactly as any unknown function.

``TABLE`` is derived from the op specs (``fxrep.ir.known_ops``): it maps each overload an ``OpSpec`` declares
with a converter to ``(canonical spelling, converter)``; ``ir.opspec`` says what a converter returns.
"""

from __future__ import annotations

from torch import fx

from ..ir import bind
from ..ir.known_ops import OPS
from ..ir.opspec import DROP, IDENTITY, Call
from ..pattern import FRONTEND, Match

#: ATen overload -> (the torch function or method name it is rewritten to, its converter)
TABLE: dict = {op: (spec.canonical, convert) for spec in OPS for op, convert in spec.aten.items()
               if convert is not None}


# keyword arguments left out where they have the torch-level function's default (the schema binds them all)
_DEFAULTS = {"alpha": 1, "approximate": "none", "attn_mask": None, "dropout_p": 0.0, "is_causal": False,
             "scale": None, "enable_gqa": False, "dtype": None, "memory_format": None}


class AtenToTorch:
    """The front-end pattern that rewrites each ATen overload of ``TABLE`` to its torch-level spelling. The
    new node keeps the old one's ``meta`` (shapes, stack trace); the engine erases the old one."""

    name, phase = "aten_to_torch", FRONTEND

    def match(self, node, ctx):
        if node.op != "call_function" or node.target not in TABLE:
            return None
        bound = bind(node)
        call = TABLE[node.target][1](bound) if bound is not None else None
        if call is None or (call is DROP and node.users):
            return None
        return Match((node,), data=(bound, call), summary=f"{node.target} in its torch spelling")

    def replace(self, match, ctx):
        node, (bound, call) = match.nodes[0], match.data
        if call is DROP:
            ctx.remove(node)
            return
        if call is IDENTITY:
            ctx.replace_node(node, ctx.resolve(bound["input"]))
            return
        target = TABLE[node.target][0]
        if isinstance(call, Call):
            target, call = call.target, (call.args, call.kwargs)
        args, kwargs = fx.node.map_arg(call, ctx.resolve)
        kwargs = {k: v for k, v in kwargs.items() if k not in _DEFAULTS or v != _DEFAULTS[k]}
        with ctx.graph.inserting_before(node):
            new = (ctx.graph.call_method(target, args, kwargs) if isinstance(target, str)
                   else ctx.graph.call_function(target, args, kwargs))
        new.meta = dict(node.meta)
        ctx.replace_node(node, new)


ATEN_TO_TORCH = AtenToTorch()
