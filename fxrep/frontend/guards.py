"""Guards of the arguments tracing fixed, made portable: fx writes ``_assert_is_none`` (a function that breaks
every later ``symbolic_trace`` once the GraphModule has been saved and loaded) and ``torch._assert``; fxrep
calls a ``FixedArgument`` module instead, whose message names the fix."""

from __future__ import annotations

import operator

from torch import fx, nn

from ..errors import InputError
from ..ir.build import fresh_attribute_name
from ..ir.effects import is_guard
from ..pattern import FRONTEND, Match

_SPECIALIZED = "has been specialized to have value"


class FixedArgument(nn.Module):
    """Run-time guard of a ``forward`` argument that was fixed while tracing: raises InputError, naming the
    fix, when the fused model is called with another value.

    A module rather than fx's ``_assert_is_none`` function: a GraphModule that calls ``_assert_is_none``
    breaks every later ``symbolic_trace`` in the process once it has been through
    ``torch.save``/``torch.load`` (KeyError 'torch.fx._symbolic_trace._assert_is_none': fx's codegen wraps it
    by a dotted name). A module call survives re-tracing as a leaf, and ``_is_impure`` keeps dead-code
    elimination away from it."""

    _is_impure = True

    def __init__(self, name: str, value, message: str):
        super().__init__()
        self.name, self.value, self.message = name, value, message

    def forward(self, value) -> None:
        same = value is self.value or (isinstance(value, bool) and isinstance(self.value, bool)
                                       and value == self.value)
        if not same:
            raise InputError(self.message)

    def extra_repr(self) -> str:
        return f"{self.name}={self.value!r}"


class PortableGuards:
    """The front-end pattern that replaces fx's guards of fixed arguments (``_assert_is_none(x, msg)``,
    ``torch._assert(x == v, msg)`` on a placeholder) by ``FixedArgument`` module calls. The guards of
    arguments in ``specialized`` (the ones fxrep fixed while tracing) get a message that names the fix; others
    keep fx's."""

    name, phase = "portable_guards", FRONTEND

    def __init__(self, specialized: dict | None = None):
        self.specialized = dict(specialized or {})

    def match(self, node, ctx):
        fixed = _fixed_argument(node)
        return Match((node,), fixed, "a guard of a fixed argument as a module call") if fixed else None

    def replace(self, match, ctx):
        (node,), (placeholder, value, message) = match.nodes, match.data
        name = message.split(" ", 1)[0]
        if name in self.specialized:
            rest = {k: v for k, v in self.specialized.items() if k != name}
            message = (f"fxrep.fuse traced this model with argument '{name}' fixed to {value!r}, so the "
                       f"fused model cannot take another value for it. To keep '{name}' an input, fuse again "
                       f"with fxrep.fuse(model, concrete_args={rest!r}) or pass it in example_inputs.")
        target = fresh_attribute_name(ctx.gm, f"fixed_{name}")
        ctx.gm.add_submodule(target, FixedArgument(name, value, message))
        with ctx.graph.inserting_before(node):
            guard = ctx.graph.call_module(target, (placeholder,))
        guard.meta = {k: v for k, v in node.meta.items() if k != "is_wrapped"}
        ctx.remove(node)  # the condition it read is left without readers: dead code


def _fixed_argument(node: fx.Node):
    """(placeholder, value, message) if ``node`` is fx's guard of a fixed argument, else None."""
    if not is_guard(node) or len(node.args) != 2 or not isinstance(node.args[1], str) or \
            _SPECIALIZED not in node.args[1]:
        return None
    condition, message = node.args
    if isinstance(condition, fx.Node) and condition.op == "placeholder":
        return condition, None, message  # _assert_is_none(x, msg)
    if (isinstance(condition, fx.Node) and condition.op == "call_function" and condition.target is operator.eq
            and isinstance(condition.args[0], fx.Node) and condition.args[0].op == "placeholder"):
        return condition.args[0], condition.args[1], message  # torch._assert(x == value, msg)
    return None

