"""``OpSpec``: everything fxrep knows about one op, in one declaration.

A spec names every spelling of the op (torch callables, Tensor method names, module classes with the call
they stand for, ATen overloads with the torch-level call each one is) and the properties the passes rely on.
The declarations are ``fxrep.ir.known_ops.OPS``; every table the passes read is derived from them
(``fxrep.ir.targets``, ``fxrep.frontend.spellings.TABLE``, row pruning's rules): nothing about an op is
written twice.

Properties, each a promise a pass relies on (a wrong one is a wrong graph, so declare only what holds for
every call of the op):

- ``elementwise``: each output element is computed from the same element of each input, inputs broadcast
  together; its values do not depend on the inputs' memory layout. Row pruning computes such an op on the
  rows read; layout analysis follows values through it to their readers.
- ``activation``: an elementwise function of one tensor, with ``variants`` its arguments that select a
  variant (GELU's ``approximate``). Parallel branches with equal activations widen (docs/identities.md §2).
- ``view``: returns its first argument's values (or some of them) rearranged, possibly sharing its memory.
- ``layout_resetting``: the result does not depend on the input's strides (Linear, LayerNorm).
- ``random``: the result is random; never merged, folded or evaluated ahead of time.
- ``guard``: a run-time check with no result; never dead code.
- ``rows``: how the op maps requested rows of its output to rows of its inputs, the name of its row rule
  (``fxrep.row_rules`` for torch-level graphs, ``fxrep.export.rows.rules`` for ATen programs: both are
  found by this name); elementwise ops default to ``"elementwise"``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch.nn as nn

#: what an ATen converter returns for an overload whose uses read its input instead (``alias``, eval dropout)
IDENTITY = object()
#: what an ATen converter returns for a check without users that is left out
DROP = object()


@dataclass(frozen=True)
class Call:
    """A call of ``target`` (a function, or a method name called on ``args[0]``), for converters that do not
    call the spec's own canonical spelling."""

    target: object
    args: tuple
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Attr:
    """A module converter's reference to one of the module's own parameters (``Attr("weight")``)."""

    name: str


def same(*names: str, to=None, **renamed: str) -> Callable:
    """An ATen converter that passes the bound arguments ``names`` positionally and ``renamed`` as keywords
    (``{new name: schema name}``), to the spec's canonical spelling or to ``to``."""
    def convert(a: dict):
        args, kwargs = tuple(a[n] for n in names), {new: a[old] for new, old in renamed.items()}
        return Call(to, args, kwargs) if to is not None else (args, kwargs)
    return convert


@dataclass(frozen=True)
class OpSpec:
    """One op: its spellings and properties (see the module docstring).

    ``aten`` maps each ATen overload to a converter ``(bound arguments) -> (args, kwargs)`` of the canonical
    spelling (the first function, else the first method), a ``Call`` of another target, ``IDENTITY``,
    ``DROP``, or None to leave that node in ATen; the map's value may itself be None for an overload that is
    known only by its properties. ``modules`` maps a module class to ``(module) -> Call``, the call that the
    module stands for (its input is prepended to the args, ``Attr`` become the module's parameters), or to
    ``IDENTITY`` for a module that returns its input (at eval). A subclass is taken for its base only where it
    inherits the base's ``forward`` unchanged.
    """

    name: str
    functions: tuple = ()
    methods: tuple = ()
    modules: Mapping[type, Callable | None] = field(default_factory=dict)
    aten: Mapping = field(default_factory=dict)
    elementwise: bool = False
    activation: bool = False
    variants: tuple = ()              # ((argument name, default), ...) that select a variant of an activation
    view: bool = False
    layout_resetting: bool = False
    random: bool = False
    guard: bool = False
    rows: str | None = None

    def __post_init__(self):
        if self.activation and not self.elementwise:
            raise ValueError(f"{self.name}: an activation is elementwise by definition")
        if self.elementwise and self.rows is None:
            object.__setattr__(self, "rows", "elementwise")

    @property
    def canonical(self):
        """The torch-level spelling ATen calls are rewritten to: the first function, else the first method."""
        return self.functions[0] if self.functions else (self.methods[0] if self.methods else None)


def activation(name: str, functions: tuple, *, methods: tuple = (), module: type | None = None,
               aten: tuple = (), variants: tuple = (), aten_condition: Callable | None = None) -> OpSpec:
    """The spec of an elementwise activation of one tensor: ``module(**variants)`` calls ``functions[0]`` with
    the same variant arguments, every overload in ``aten`` binds ``(input, *variants)`` by those names (and
    is this activation where ``aten_condition(bound)`` holds)."""
    names = tuple(n for n, _ in variants)

    def from_module(m: nn.Module) -> Call:
        return Call(functions[0], (), {n: getattr(m, n) for n in names})

    def from_aten(a: dict):
        if aten_condition is not None and not aten_condition(a):
            return None
        return (a["input"],), {n: a[n] for n in names}

    return OpSpec(name, functions, methods, {module: from_module} if module else {},
                  {op: from_aten for op in aten}, elementwise=True, activation=True, variants=variants)

