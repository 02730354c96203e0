"""What a user's model looks like, so fxrep can prove it left it alone (and put it back after tracing).

Tracing runs the user's ``forward`` on Proxies, and ``forward`` may write to the model: timm's LeViT and
EfficientFormer fill an ``attention_bias_cache`` dict in eval mode, so a plain trace leaves an fx Proxy in the
user's model. ``preserved(model)`` restores every module's attributes, and the contents of the dicts, lists
and sets they hold, when the block ends. ``ModelSnapshot`` records parameters, buffers and every attribute of
every module (containers walked, tensors compared bit for bit) and ``diff`` names the first change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import fx, nn

_CONTAINERS = (dict, list, set)
_MAX_DEPTH = 4


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.reshape(-1).contiguous().view(torch.uint8) if t.numel() and not t.is_quantized else t.reshape(-1)


class _TensorLeaf:
    """A tensor seen in the model: identity, metadata and a copy of its bits (NaN equals NaN)."""

    __slots__ = ("ident", "meta", "bits")

    def __init__(self, t: torch.Tensor):
        self.ident = id(t)
        self.meta = (t.dtype, tuple(t.shape), t.device.type, isinstance(t, nn.Parameter), t.requires_grad)
        self.bits = None if t.is_meta else _bits(t).clone()

    def __eq__(self, other) -> bool:
        if not isinstance(other, _TensorLeaf) or self.ident != other.ident or self.meta != other.meta:
            return False
        if self.bits is None or other.bits is None:
            return self.bits is other.bits
        return torch.equal(self.bits, other.bits)

    __hash__ = None

    def __repr__(self) -> str:
        return f"tensor{list(self.meta[1])}"


def _value(v, depth: int = 0):
    """A comparable picture of ``v``: containers walked, tensors as _TensorLeaf, other objects by identity."""
    if isinstance(v, torch.Tensor):
        return _TensorLeaf(v)
    if v is None or isinstance(v, (bool, int, float, complex, str, bytes)):
        return (type(v).__name__, v)
    if isinstance(v, nn.Module):
        return ("module", id(v))  # its own attributes are pictured under its own name
    if depth < _MAX_DEPTH:
        if isinstance(v, dict):
            return ("dict", id(v), [(_value(k, depth + 1), _value(x, depth + 1)) for k, x in v.items()])
        if isinstance(v, (list, tuple)):
            return (type(v).__name__, id(v) if isinstance(v, list) else None,
                    [_value(x, depth + 1) for x in v])
        if isinstance(v, (set, frozenset)):
            return (type(v).__name__, id(v), sorted(repr(x) for x in v))
    return ("object", type(v).__qualname__, id(v))


class ModelSnapshot:
    """Every attribute of every module of a model (parameters and buffers included), for ``diff``."""

    def __init__(self, model: nn.Module):
        self.modules = {name: {k: _value(v) for k, v in vars(m).items()} for name, m in model.named_modules()}

    def diff(self, model: nn.Module) -> str:
        """'' if ``model`` looks as it did, else a sentence naming the first module attribute that changed."""
        now = ModelSnapshot(model).modules
        for name in self.modules.keys() | now.keys():
            where = f"module '{name}'" if name else "the top-level module"
            if name not in now or name not in self.modules:
                return f"{where} was {'removed' if name not in now else 'added'}"
            old, new = self.modules[name], now[name]
            for attr in sorted(old.keys() | new.keys()):
                if attr not in new:
                    return f"{where} lost attribute '{attr}'"
                if attr not in old:
                    return f"{where} has a new attribute '{attr}'"
                if old[attr] != new[attr]:
                    return (f"{where}: attribute '{attr}' changed ({_describe(old[attr])} -> "
                            f"{_describe(new[attr])})")
        return ""


def _describe(picture) -> str:
    text = _render(picture)
    return text if len(text) <= 160 else text[:157] + "..."


def _render(p) -> str:
    """A picture from ``_value`` as a person would write the value: {'cpu': tensor[6, 49, 49]}."""
    if isinstance(p, _TensorLeaf):
        return repr(p)
    kind = p[0]
    if kind == "dict":
        return "{" + ", ".join(f"{_render(k)}: {_render(v)}" for k, v in p[2]) + "}"
    if kind in ("list", "tuple"):
        inner = ", ".join(_render(x) for x in p[2])
        return f"[{inner}]" if kind == "list" else f"({inner})"
    if kind in ("set", "frozenset"):
        return "{" + ", ".join(p[2]) + "}"
    if kind == "object":
        return f"<{p[1]} object>"
    if kind == "module":
        return "<module>"
    return repr(p[1])


def stale_proxies(model: nn.Module) -> list[str]:
    """'module.attribute' of every dict entry in the model that holds a torch.fx Proxy: left there by an
    earlier plain ``torch.fx`` trace of a model that caches values (timm's LeViT ``attention_bias_cache``)."""
    found = []
    for name, m in model.named_modules():
        for k, v in vars(m).items():
            if isinstance(v, dict) and any(isinstance(x, fx.Proxy) for x in v.values()):
                found.append(f"{name}.{k}" if name else k)
    return found


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Put every module's attributes back as they were when the block ends: attributes added are removed,
    rebound ones restored, and dicts, lists and sets the module holds get their old contents back (in place,
    so other references to them see the restored contents too). Inside the block, dict entries holding an
    fx Proxy of an earlier trace are hidden, so a new trace cannot read a node of another graph."""
    saved = []
    for m in model.modules():
        attrs = dict(vars(m))
        contents = {k: _shallow_copy(v) for k, v in attrs.items() if isinstance(v, _CONTAINERS)}
        saved.append((m, attrs, contents))
        for v in attrs.values():
            if isinstance(v, dict):
                for k in [k for k, x in v.items() if isinstance(x, fx.Proxy)]:
                    del v[k]
    try:
        yield
    finally:
        for m, attrs, contents in saved:
            d = vars(m)
            for k in [k for k in d if k not in attrs]:
                del d[k]
            d.update(attrs)
            for k, old in contents.items():
                _restore(attrs[k], old)


def _shallow_copy(v):
    return dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else set(v)


def _restore(container, old) -> None:
    if isinstance(container, list):
        container[:] = old
    else:
        container.clear()
        container.update(old)
