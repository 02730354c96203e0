"""One argument binder for every op: ``bind(node)`` maps a call's positional and keyword arguments to the
parameter names of the callee, defaults filled in.

Parameter names come from torch: ``inspect.signature`` for Python functions (``F.layer_norm``, ``F.softmax``)
and ``torch.fx.operator_schemas.get_signature_for_torch_op`` (the TorchScript schemas behind
``Node.normalized_arguments``) for builtins (``F.linear``, ``F.scaled_dot_product_attention``, ``torch.add``).
A method call ``x.softmax(-1)`` binds like ``torch.softmax(x, -1)``. Unlike ``normalize_function``, binding
needs no argument types: an op whose overloads differ only in types (``torch.add``) binds by the names they
share, and the parameter lists are looked up once per callee and argument layout, so it is cheap enough
to call from every reader.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import fx
from torch.fx.operator_schemas import get_signature_for_torch_op

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


@functools.lru_cache(maxsize=4096)
def _signatures(target, skip: int = 0) -> tuple:
    """The signatures ``target`` may be called with, less its first ``skip`` parameters (a method's self)."""
    try:
        sig = inspect.signature(target)
        if skip:
            sig = sig.replace(parameters=list(sig.parameters.values())[skip:])
        # ATen overloads (``torch.ops.aten.linear.default``) present a generic (*args, **kwargs): their names
        # are in the schema below
        if any(p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values()):
            return (sig,)
    except (TypeError, ValueError):
        pass
    try:
        sigs = tuple(get_signature_for_torch_op(target) or ())
    except Exception:  # noqa: BLE001 - torch raises various errors for callables it has no schema for
        return ()
    # graph nodes are tensors: the scalar overloads of math ops (``tanh(a: float)``) name their argument
    # otherwise and would make every call ambiguous
    tensor_sigs = tuple(s for s in sigs if any("Tensor" in str(p.annotation) for p in s.parameters.values()))
    return tensor_sigs or sigs


def _layout(sig: inspect.Signature, n_args: int, kwarg_names: frozenset):
    """(positional names, name taking the rest of the positionals or None, defaults) if ``sig`` accepts this
    call shape, else None."""
    params = list(sig.parameters.values())
    positional = [p.name for p in params if p.kind in _POSITIONAL]
    rest = next((p.name for p in params if p.kind == inspect.Parameter.VAR_POSITIONAL), None)
    if n_args > len(positional) and rest is None:
        return None
    names = {p.name for p in params if p.kind != inspect.Parameter.VAR_POSITIONAL}
    if not kwarg_names <= names and not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    taken = set(positional[:n_args]) | kwarg_names
    if any(p.default is inspect.Parameter.empty and p.name not in taken for p in params
           if p.kind in _POSITIONAL or p.kind == inspect.Parameter.KEYWORD_ONLY):
        return None
    defaults = tuple((p.name, p.default) for p in params if p.default is not inspect.Parameter.empty)
    return tuple(positional[:n_args]), (rest if n_args > len(positional) else None), defaults


@functools.lru_cache(maxsize=4096)
def _plan(target, skip: int, n_args: int, kwarg_names: frozenset):
    """The layout shared by every overload of ``target`` that accepts this call shape (names of the positions
    used, and only the defaults all of them agree on), or None when there is none or they disagree."""
    layouts = [lay
               for sig in _signatures(target, skip) if (lay := _layout(sig, n_args, kwarg_names)) is not None]
    if not layouts or any(lay[:2] != layouts[0][:2] for lay in layouts):
        return None
    common = tuple(d for d in layouts[0][2] if all(d in lay[2] for lay in layouts[1:]))
    return layouts[0][0], layouts[0][1], common


def _callee(node: fx.Node) -> tuple:
    """(the function bound against, how many leading parameters the call does not pass). For a module call
    that is the class's ``forward`` and its ``self``: keyed by the class, so the caches below never keep a
    user's module alive."""
    if node.op == "call_function":
        return node.target, 0
    if node.op == "call_method":
        return getattr(torch, node.target, None) or getattr(torch.Tensor, node.target, None), 0
    if node.op == "call_module":
        module = node.graph.owning_module
        for atom in node.target.split("."):
            module = getattr(module, atom, None)
        forward = getattr(type(module), "forward", None) if module is not None else None
        return (forward, 1) if inspect.isfunction(forward) else (None, 0)
    return None, 0


def bind(node: fx.Node) -> dict | None:
    """``{parameter name: argument}`` of a ``call_function``/``call_method``/``call_module`` node, defaults
    included, or None
    when the callee has no signature torch can name (or its overloads disagree about this call's names)."""
    callee, skip = _callee(node)
    if callee is None:
        return None
    try:
        plan = _plan(callee, skip, len(node.args), frozenset(node.kwargs))
    except TypeError:  # an unhashable callee
        return None
    if plan is None:
        return None
    names, rest, defaults = plan
    bound = dict(defaults)
    bound.update(zip(names, node.args))
    if rest is not None:
        bound[rest] = tuple(node.args[len(names):])
    bound.update(node.kwargs)
    return bound


def input_of(node) -> fx.Node | None:
    """The tensor an op computes on: its first argument (``input``, or ``self`` of a method or module call),
    however it is passed; None where that is not a node."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method", "call_module"):
        return None
    if node.args:
        x = node.args[0]
    else:
        x = (bind(node) or {}).get("input")
    return x if isinstance(x, fx.Node) else None
