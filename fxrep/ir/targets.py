"""The readers' tables: which torch callables, methods and modules are which op, derived from the op specs.

Nothing here is declared by hand except what is not an op: Python's in-place operators and the functions of
shape arithmetic. A new spelling of an op goes into its ``OpSpec`` (``fxrep.ir.known_ops``); a new argument
layout needs nothing (``ir.binding`` reads argument names from torch's own signatures).
"""

from __future__ import annotations

import operator

import torch.nn as nn

from .known_ops import OPS
from .opspec import IDENTITY, OpSpec

SPECS: dict[str, OpSpec] = {s.name: s for s in OPS}


def _functions(*names: str) -> set:
    return {f for n in names for f in SPECS[n].functions}


def _where(prop: str) -> tuple[set, set]:
    """(functions, method names) of the specs with property ``prop``."""
    specs = [s for s in OPS if getattr(s, prop)]
    return {f for s in specs for f in s.functions}, {m for s in specs for m in s.methods}


LINEAR_TARGETS = _functions("linear")
LAYER_NORM_TARGETS = _functions("layer_norm")
SDPA_TARGETS = _functions("scaled_dot_product_attention")
MATMUL_TARGETS = _functions("matmul")
DROPOUT_TARGETS = _functions("dropout")
STACK_TARGETS = _functions("stack")
REDUCTIONS = {f: n for n in ("sum", "mean") for f in SPECS[n].functions}   # and the methods of the same names

# Arithmetic: (kind, functions, method name). ``ir.readers.arith_kind`` is the one classifier over this.
ARITHMETIC = tuple((n, set(SPECS[n].functions), SPECS[n].methods[0])
                   for n in ("add", "sub", "mul", "div", "neg"))
NEG_TARGETS = _functions("neg")
ARITHMETIC_TARGETS = set().union(*(targets for _, targets, _ in ARITHMETIC))

# Activations: function -> name, method -> name, name -> ((variant argument, default), ...)
_ACTIVATIONS = [s for s in OPS if s.activation]
ACTIVATION_FUNCTIONS = {f: s.name for s in _ACTIVATIONS for f in s.functions}
ACTIVATION_METHODS = {m: s.name for s in _ACTIVATIONS for m in s.methods}
ACTIVATION_VARIANTS = {s.name: s.variants for s in _ACTIVATIONS}

ELEMENTWISE_FUNCTIONS, ELEMENTWISE_METHODS = _where("elementwise")
VIEW_FUNCTIONS, VIEW_METHODS = _where("view")
LAYOUT_RESETTING, _ = _where("layout_resetting")
RANDOM_TARGETS, _ = _where("random")
GUARD_TARGETS, _ = _where("guard")

# Module class -> (its spec, the call it stands for: ``module -> Call``, or IDENTITY)
MODULES = {cls: (s, convert) for s in OPS for cls, convert in s.modules.items()}


def module_spelling(module: nn.Module):
    """``(spec, convert)`` for a module of a declared class, or of a subclass that inherits that class's
    ``forward`` unchanged (a subclass with its own ``forward`` computes something else); else None."""
    for cls in type(module).__mro__:
        if cls in MODULES:
            return MODULES[cls] if type(module).forward is cls.forward else None
    return None


def is_op(node, *names: str) -> bool:
    """Whether ``node`` calls a torch-level spelling (function or Tensor method) of one of the named ops."""
    if node.op == "call_function":
        return any(node.target in SPECS[n].functions for n in names)
    if node.op == "call_method":
        return any(node.target in SPECS[n].methods for n in names)
    return False


_BY_FUNCTION = {f: s for s in OPS for f in (*s.functions, *s.aten)}
_BY_METHOD = {m: s for s in OPS for m in s.methods}


def spec_of(node) -> OpSpec | None:
    """The spec of the op ``node`` calls (a torch function, an ATen overload or a Tensor method), or None."""
    if node.op == "call_function":
        try:
            return _BY_FUNCTION.get(node.target)
        except TypeError:  # an unhashable callable: not one of the specs'
            return None
    if node.op == "call_method":
        return _BY_METHOD.get(node.target)
    return None


def is_identity_module(module: nn.Module) -> bool:
    found = module_spelling(module)
    return found is not None and found[1] is IDENTITY


INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                     operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                     operator.imatmul,
                     operator.setitem}

# Functions whose value does not depend on the tensors' values, used while evaluating shape arithmetic.
SHAPE_ARITHMETIC = {getattr, operator.getitem, operator.mul, operator.floordiv, operator.add, operator.sub,
                    operator.truediv}
SHAPE_METHODS = {"size", "dim"}
