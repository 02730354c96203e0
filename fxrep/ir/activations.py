"""Elementwise activations, one declaration each: every spelling of the op and what fxrep may assume of it.

An ``ActivationSpec`` names the op's torch functions, Tensor methods, module class and ATen overloads, and the
argument that selects a variant (GELU's ``approximate``). Every table that needs activations is derived from
``ACTIVATIONS``: the readers' function and method tables (``ir.targets``), the module-to-function rewrite
(``functionalize_modules``), the ATen-to-torch spellings (``fxrep.frontend.spellings``) and the ops row
pruning moves row selections through (``fxrep.export.rows``). An activation is elementwise by definition here:
one output element from the same element of its input, which is what widening (docs/identities.md §2) and row
pruning need.

Adding one, for instance CELU, is one entry (and its tests)::

    ActivationSpec("celu", functions=(F.celu, torch.celu), module=nn.CELU, aten=(aten.celu.default,),
                   variant=("alpha", 1.0))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

aten = torch.ops.aten


@dataclass(frozen=True)
class ActivationSpec:
    name: str
    functions: tuple                  # torch callables; the first is the canonical spelling
    methods: tuple = ()               # Tensor method names
    module: type | None = None        # its nn.Module (the variant argument is an attribute of the same name)
    aten: tuple = ()                  # ATen overloads, arguments (input, variant) by the overload's names
    variant: tuple | None = None      # (argument name, default) that selects a variant of the op
    aten_condition: Callable | None = None  # bound ATen arguments -> whether the call is this activation

    def module_call(self, module: nn.Module) -> tuple:
        """(function, kwargs) that compute what ``module`` computes."""
        kwargs = {self.variant[0]: getattr(module, self.variant[0])} if self.variant else {}
        return self.functions[0], kwargs

    def aten_call(self, bound: dict):
        """(args, kwargs) of the canonical function for an ATen call's bound arguments, or None."""
        if self.aten_condition is not None and not self.aten_condition(bound):
            return None
        kwargs = {self.variant[0]: bound[self.variant[0]]} if self.variant else {}
        return (bound["input"],), kwargs


ACTIVATIONS = (
    ActivationSpec("gelu", (F.gelu,), module=nn.GELU, aten=(aten.gelu.default,),
                   variant=("approximate", "none")),
    ActivationSpec("relu", (F.relu, torch.relu), methods=("relu",), module=nn.ReLU,
                   aten=(aten.relu.default,)),
    ActivationSpec("silu", (F.silu,), module=nn.SiLU, aten=(aten.silu.default,)),
    ActivationSpec("sigmoid", (torch.sigmoid, F.sigmoid), methods=("sigmoid",), module=nn.Sigmoid,
                   aten=(aten.sigmoid.default,)),
    ActivationSpec("tanh", (torch.tanh, F.tanh), methods=("tanh",), module=nn.Tanh,
                   aten=(aten.tanh.default,)),
    ActivationSpec("hardswish", (F.hardswish,), module=nn.Hardswish, aten=(aten.hardswish.default,)),
    ActivationSpec("mish", (F.mish,), module=nn.Mish, aten=(aten.mish.default,)),
    ActivationSpec("leaky_relu", (F.leaky_relu,), module=nn.LeakyReLU, aten=(aten.leaky_relu.default,),
                   variant=("negative_slope", 0.01)),
    ActivationSpec("elu", (F.elu,), module=nn.ELU, aten=(aten.elu.default,), variant=("alpha", 1.0),
                   aten_condition=lambda a: a.get("scale", 1) == 1 and a.get("input_scale", 1) == 1),
)


def _derived(specs) -> tuple:
    functions = {f: s.name for s in specs for f in s.functions}
    methods = {m: s.name for s in specs for m in s.methods}
    variants = {s.name: s.variant for s in specs if s.variant is not None}
    modules = {s.module: s for s in specs if s.module is not None}
    overloads = {op: s for s in specs for op in s.aten}
    return functions, methods, variants, modules, overloads


#: function -> name, method -> name, name -> (variant argument, default), module class -> spec,
#: ATen overload -> spec
ACTIVATION_FUNCTIONS, ACTIVATION_METHODS, ACTIVATION_VARIANT_ARG, ACTIVATION_MODULES, ACTIVATION_ATEN = \
    _derived(ACTIVATIONS)
