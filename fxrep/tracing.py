"""Tracing a user's module with torch.fx: which arguments are fixed, clear errors, and no trace left behind.

``trace(model)`` is ``torch.fx`` symbolic tracing with three differences:

- **Optional flags are fixed, inputs never silently.** An argument with a ``None`` or ``bool`` default (timm's
  ``attn_mask=None`` / ``is_causal=False``) is fixed to its default so that it does not become an input that
  blocks merging. The model's first argument and every argument ``example_inputs`` supply as tensors stay
  inputs (``forward(self, pixel_values=None)`` is an input, not a constant). fx's runtime guard for each fixed
  argument is kept, with a message that names the fix: calling the fused model with another value raises.
- **Nothing of the model changes.** ``forward`` may write to the model while it is traced (timm's LeViT and
  EfficientFormer fill an ``attention_bias_cache``; fx stows tensors it meets as ``_tensor_constant``
  attributes). Every module's attributes and the contents of its dicts, lists and sets are restored.
- **Failures name the module** that could not be traced, and the fix.
"""

from __future__ import annotations

import dis
import functools
import inspect

import torch
from torch import fx, nn

from .errors import TraceError
from .snapshot import preserved


@functools.lru_cache(maxsize=1024)
def _unpack_counts(code) -> dict:
    """Offset -> item count of every ``UNPACK_SEQUENCE`` instruction of a code object."""
    return {i.offset: i.argval for i in dis.get_instructions(code) if i.opname == "UNPACK_SEQUENCE"}


def _fx_is_as_written() -> bool:
    """True when the fx methods the fast paths below stand in for have the signatures they were written
    against (``Tracer.getattr`` is marked not backward compatible). Otherwise fxrep traces with fx's own."""
    def params(f):
        return list(inspect.signature(f).parameters)

    return (params(fx.Tracer.getattr) == ["self", "attr", "attr_val", "parameter_proxy_cache"]
            and params(fx.Tracer.create_arg) == ["self", "a"] and hasattr(fx.Tracer, "get_fresh_qualname")
            and params(fx.Proxy.__iter__) == ["self"] and hasattr(fx.Tracer, "iter"))


FAST_PATHS = _fx_is_as_written()


class _UnpackingProxy(fx.Proxy):
    """``fx.Proxy`` whose tuple unpacking (``q, k, v = qkv.unbind(0)``, ``B, N, C = x.shape``) looks the
    calling instruction up in a per-code-object table. fx disassembles the caller's whole code object on every
    unpack, which was a third of the trace time of a 12-block branched ViT. Where the calling instruction is
    not an ``UNPACK_SEQUENCE`` it does what fx's ``Proxy.__iter__`` does there: ``tracer.iter`` (which raises
    fx's TraceError unless a tracer overrides it). ``tests/test_engine.py`` checks it against fx's."""

    def __iter__(self):
        frame = inspect.currentframe().f_back  # f_lasti: byte offset of the instruction being run
        count = _unpack_counts(frame.f_code).get(frame.f_lasti)
        if count is not None:
            return (self[i] for i in range(count))
        return self.tracer.iter(self)


class _FastLookups:
    """Parameter and buffer names from a map built once per trace (fx scans every parameter of the model on
    each lookup, which is quadratic in model size). Anything the map does not name goes to fx's own path."""

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _UnpackingProxy(node, self)

    def _name_of(self, kind: str, t: torch.Tensor) -> str | None:
        if getattr(self, "_names_of", (None, None))[0] is not self.root:
            names: dict = {}
            for name, p in self.root.named_parameters():
                names.setdefault(("param", id(p)), name)
            for name, b in self.root.named_buffers():
                names.setdefault(("buffer", id(b)), name)
            self._names_of = (self.root, names)
        return self._names_of[1].get((kind, id(t)))

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        """As fx's, with the name lookup of ``_name_of``."""
        if isinstance(attr_val, torch.Tensor):
            if isinstance(attr_val, nn.Parameter):
                kind = "param"
            else:
                kind = "buffer" if self.proxy_buffer_attributes else None
            name = self._name_of(kind, attr_val)
            if name is not None and not self.param_shapes_constant:
                if name not in parameter_proxy_cache:
                    parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
                return parameter_proxy_cache[name]
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_arg(self, a):
        """As fx's for tensors, with the name lookup of ``_name_of``. A tensor that is neither a parameter nor
        a buffer is stowed as a ``_tensor_constant`` attribute of the root (``trace`` restores the root)."""
        if isinstance(a, torch.Tensor):
            name = self._name_of("param" if isinstance(a, nn.Parameter) else "buffer", a)
            if name is None and not isinstance(a, nn.Parameter):
                name = self.tensor_attrs.get(a)
                if name is None:
                    name = self.get_fresh_qualname("_tensor_constant")
                    self.tensor_attrs[a] = name
                    setattr(self.root, name, a)
            if name is not None:
                return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)


class _NamingTracer(*((_FastLookups,) if FAST_PATHS else ()), fx.Tracer):
    """A Tracer that remembers which module it was inside, so a trace failure can name it."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []

    def call_module(self, m, forward, args, kwargs):
        self.stack.append(self.path_of_module(m) or type(m).__name__)
        out = super().call_module(m, forward, args, kwargs)
        self.stack.pop()
        return out


def default_concrete_args(model: nn.Module, example_inputs=None) -> dict:
    """The arguments ``trace`` fixes: those with a ``None`` or ``bool`` default, except the model's first
    argument; an argument that ``example_inputs`` supply is fixed only if the value given is None or a
    bool."""
    supplied = tuple(example_inputs or ())
    concrete = {}
    positional = True
    for i, p in enumerate(inspect.signature(model.forward).parameters.values()):
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            positional = False
            continue
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        if positional and p.kind is not inspect.Parameter.KEYWORD_ONLY and i < len(supplied):
            v = supplied[i]
            if v is None or isinstance(v, bool):
                concrete[p.name] = v
            continue
        if i == 0 and positional or p.default is inspect.Parameter.empty:
            continue
        if p.default is None or isinstance(p.default, bool):
            concrete[p.name] = p.default
    return concrete


def trace_graph(model: nn.Module, example_inputs=None, concrete_args: dict | None = None) -> fx.GraphModule:
    """``torch.fx`` trace of ``model`` (see the module docstring for what is fixed and what is restored),
    not yet recompiled, with fx's own guards of the arguments it fixed (``fxrep.frontend.guards`` makes them
    portable). ``concrete_args`` replaces the default choice (``default_concrete_args``): exactly the
    arguments named there are fixed, as in ``torch.fx.symbolic_trace``; they are recorded in
    ``gm.meta["fxrep_specialized"]``. Raises TraceError naming the module that failed."""
    concrete = default_concrete_args(model, example_inputs) if concrete_args is None else dict(concrete_args)
    tracer = _NamingTracer()
    with preserved(model):
        try:
            graph = tracer.trace(model, concrete_args=concrete or None)
            gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
        except Exception as e:  # torch raises TraceError, TypeError, RuntimeError, ... from user code
            where = tracer.stack[-1] if tracer.stack else type(model).__name__
            raise TraceError(
                f"torch.fx could not trace {type(model).__name__} (failed inside module '{where}'): "
                f"{type(e).__name__}: {e}\n"
                "Fix: let fxrep capture it with torch.export, fxrep.fuse(model, example_inputs=(x,)) "
                "(capture='auto', the default, does when fx fails); or capture it yourself "
                "(torch.export.export(model, (x,))) and pass the program to fxrep.fuse."
            ) from e
    gm.meta["fxrep_specialized"] = dict(concrete)
    return gm
