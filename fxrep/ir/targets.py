"""The spelling tables: which torch callables, methods and modules are which op.

Adding a spelling of an op that fxrep already understands means adding it here (and, for a new argument
layout, nothing else: ``ir.binding`` reads argument names from torch's own signatures).
"""

from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx._symbolic_trace import _assert_is_none

from .activations import (  # noqa: F401 - re-exported: the readers' tables
    ACTIVATION_FUNCTIONS,
    ACTIVATION_METHODS,
    ACTIVATION_MODULES,
    ACTIVATION_VARIANT_ARG,
)

LINEAR_TARGETS = {F.linear, torch._C._nn.linear}
LAYER_NORM_TARGETS = {F.layer_norm, torch.layer_norm}
SDPA_TARGETS = {F.scaled_dot_product_attention}
SOFTMAX_TARGETS = {F.softmax, torch.softmax, torch.Tensor.softmax}
MATMUL_TARGETS = {operator.matmul, torch.matmul, torch.bmm}  # bmm: matmul of 3-d tensors
DROPOUT_TARGETS = {F.dropout, torch.dropout}

# Arithmetic: (kind, functions, method name). ``ir.readers.arith_kind`` is the one classifier over this.
ARITHMETIC = (
    ("add", {operator.add, torch.add}, "add"),
    ("sub", {operator.sub, torch.sub}, "sub"),
    ("mul", {operator.mul, torch.mul}, "mul"),
    ("div", {operator.truediv, torch.div, torch.true_divide}, "div"),
    ("neg", {operator.neg, torch.neg}, "neg"),
)
ADD_TARGETS, SUB_TARGETS, MUL_TARGETS, DIV_TARGETS, NEG_TARGETS = (targets for _, targets, _ in ARITHMETIC)
ARITHMETIC_TARGETS = set().union(*(targets for _, targets, _ in ARITHMETIC))

# Elementwise activations: one ActivationSpec each (``ir.activations``); these tables are derived from them.
# Modules: the class -> its spec (``functionalize_modules`` calls the spec's function); the identity at eval.
IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)

# Runtime checks with no result: never dead code, never merged.
GUARD_TARGETS = {torch._assert, torch._assert_async, _assert_is_none}

# Ops whose result is random: never merged or evaluated ahead of time.
RANDOM_TARGETS = {torch.rand, torch.randn, torch.randint, torch.rand_like, torch.randn_like, torch.bernoulli,
                  torch.normal, torch.multinomial, F.dropout, torch.dropout, torch.randperm}

# Ops that return a view of their first argument (or the argument itself): values unchanged, layout follows.
VIEW_METHODS = {"reshape", "view", "permute", "transpose", "t", "unbind", "unflatten", "flatten", "chunk",
                "split", "contiguous", "swapaxes", "squeeze", "unsqueeze", "movedim", "moveaxis", "select",
                "narrow"}
VIEW_FUNCTIONS = {torch.reshape, torch.permute, torch.transpose, torch.t, torch.unbind, torch.flatten,
                  torch.chunk, torch.split, operator.getitem, torch.swapaxes, torch.squeeze, torch.unsqueeze,
                  torch.movedim, torch.moveaxis, torch.unflatten, torch.select, torch.narrow}

# Readers whose result does not depend on the strides of their input (measured: a permuted input gives the
# same values, up to the GEMM's summation order, and a contiguous output; tests/test_ir.py).
LAYOUT_RESETTING = LINEAR_TARGETS | LAYER_NORM_TARGETS
ELEMENTWISE_METHODS = {"add", "sub", "mul", "div", "neg", "float", "double", "half", "to", "type_as"}

INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                     operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                     operator.imatmul,
                     operator.setitem}

# Functions whose value does not depend on the tensors' values, used while evaluating shape arithmetic.
SHAPE_ARITHMETIC = {getattr, operator.getitem, operator.mul, operator.floordiv, operator.add, operator.sub,
                    operator.truediv}
SHAPE_METHODS = {"size", "dim"}

# Stacking and the reductions over a stacked axis (``torch.stack(xs).sum(0)``: a sum in another spelling).
STACK_TARGETS = {torch.stack}
REDUCTIONS = {torch.sum: "sum", torch.mean: "mean"}   # and the methods of the same names
