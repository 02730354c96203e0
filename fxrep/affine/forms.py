"""Affine forms and their algebra: ``sum_k T_k base_k + bias`` with each ``T_k`` a scalar, a per-channel
vector or a matrix, all float64 (or a model-dtype weight kept as is until arithmetic needs it). Pure tensor
code, no graph rewriting; ``fxrep.affine.analysis`` computes forms of nodes, ``fxrep.affine.materialize``
emits them.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from .. import algebra
from ..ir import activation_key, as_layer_norm, as_linear, fingerprint, input_of
from ..ir.build import bitwise_equal

f64 = algebra.f64


class Affine:
    """``sum_k terms[base_k] @ base_k + bias`` (see module docstring).

    Terms are float64, except the weight of a Linear whose form is just that Linear, and one exact product of
    it (``algebra.scale_term``): they stay in the model's dtype (exactly representable in float64) until
    arithmetic needs them, through ``_exact64``. Most Linears are never merged, and converting every weight of
    a large model each analysis would dominate fuse time.
    """

    __slots__ = ("terms", "bias", "dtype", "zeros")

    def __init__(self, terms: dict, bias: torch.Tensor | None, dtype: torch.dtype | None, zeros=frozenset()):
        self.terms, self.bias, self.dtype = terms, bias, dtype
        self.zeros = frozenset(zeros)  # bases whose term is exactly zero (only a zero scale makes them)

    @staticmethod
    def base(node: fx.Node) -> Affine:
        return Affine({node: torch.ones((), dtype=f64)}, None, None)

    def out_size(self) -> int | None:
        for t in self.terms.values():
            if t.dim() >= 1:
                return t.shape[0]
        if self.bias is not None and self.bias.dim() == 1:
            return self.bias.shape[0]
        return None


class LazySum:
    """A left-to-right sum of same-shape matrix terms, computed when first needed, into one float64 buffer.

    ``((W1 + W2) + W3) + W4`` over a chain of add nodes needs only the last sum (unless an intermediate one is
    itself a stop node): the intermediate float64 matrices are never made, and the sum is accumulated in
    place, which gives the same bits as the pairwise float64 sums (same order, each step rounded once)."""

    __slots__ = ("parts", "shape", "_value")
    dtype = f64

    def __init__(self, parts: list):
        self.parts, self.shape, self._value = parts, parts[0].shape, None

    def dim(self) -> int:
        return 2

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def value(self) -> torch.Tensor:
        if self._value is None:
            acc = torch.empty(self.shape, dtype=f64).copy_(self.parts[0])  # (a part may be an expanded zero)
            for p in self.parts[1:]:
                acc += p  # a float32 part is promoted exactly
            self._value = acc
        return self._value


def dense(t):
    """A term as a tensor (its dtype kept)."""
    return t.value() if isinstance(t, LazySum) else t


def _exact64(t) -> torch.Tensor:
    """A term as a float64 tensor (model-dtype values are exactly representable)."""
    t = dense(t)
    return t if t.dtype == f64 else t.to(f64)


def _add_terms(a, b):
    if a.dim() == 2 and b.dim() == 2:
        if a.shape != b.shape:
            return None
        return LazySum((a.parts if isinstance(a, LazySum) else [a]) + [dense(b)])  # same order as a + b
    a, b = _exact64(a), _exact64(b)
    if a.dim() > b.dim():
        a, b = b, a
    if b.dim() <= 1:
        if a.dim() == 1 and a.shape != b.shape:
            return None
        return a + b
    # b is a matrix, a a scalar or diagonal: only a square matrix can absorb it
    if b.shape[0] != b.shape[1] or (a.dim() == 1 and a.shape[0] != b.shape[0]):
        return None
    eye = torch.eye(b.shape[0], dtype=f64)
    return b + (eye * a if a.dim() == 0 else torch.diag(a))


def _add_bias(a, b):
    if a is None:
        return b
    if b is None:
        return a
    if a.dim() == 1 and b.dim() == 1 and a.shape != b.shape:
        return None
    return a + b


class TermCache:
    """Float64 term arithmetic memoized by operand identity, for one analysis.

    The stop-node fixed point evaluates forms more than once; when a node becomes a stop node, the forms
    downstream of it change, but their matrix sums and scalings (the expensive part) do not. Operands are
    kept alive with the results, so an ``id`` is never reused while the cache lives. (A cache kept across
    analyses was measured: no faster, since rewrites change the operands, and it holds more memory.)"""

    def __init__(self):
        self._results: dict = {}

    def add(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
        key = ("add", id(a), id(b))
        if key not in self._results:
            self._results[key] = (a, b, _add_terms(a, b))
        return self._results[key][2]

    def scale(self, c: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        key = ("scale", id(t), tuple(c.shape), c.numpy().tobytes())
        if key not in self._results:
            self._results[key] = (t, algebra.scale_term(c, dense(t)))
        return self._results[key][1]


def _add_known_zero(a, b, a_zero: bool, b_zero: bool):
    """``a + b`` without arithmetic when one of two same-shape terms is known to be exactly zero."""
    if a.shape != b.shape:
        return None
    if a_zero:
        return b
    if b_zero:
        return a
    return None


def plus(x: Affine, y: Affine, sign: float = 1.0, cache: TermCache | None = None) -> Affine | None:
    sx, sy = x.out_size(), y.out_size()
    if sx is not None and sy is not None and sx != sy:
        return None  # would broadcast along the channel dim
    terms = dict(x.terms)
    for node, t in y.terms.items():
        if sign != 1.0:
            t = _exact64(t) * sign
        if node in terms:
            merged = _add_known_zero(terms[node], t, node in x.zeros, node in y.zeros)
            if merged is None:
                merged = cache.add(terms[node], t) if cache is not None else _add_terms(terms[node], t)
            if merged is None:
                return None
            terms[node] = merged
        else:
            terms[node] = t
    bias = _add_bias(x.bias, y.bias if y.bias is None or sign == 1.0 else y.bias * sign)
    if bias is None and (x.bias is not None or y.bias is not None):
        return None
    zeros = (x.zeros - y.terms.keys()) | (y.zeros - x.terms.keys()) | (x.zeros & y.zeros)
    return without_zero_terms(Affine(terms, bias, x.dtype or y.dtype, zeros))


def shifted(x: Affine, c: torch.Tensor) -> Affine | None:
    s = x.out_size()
    if c.dim() == 1 and s is not None and c.shape[0] != s:
        return None
    bias = _add_bias(x.bias, c)
    return None if bias is None else Affine(dict(x.terms), bias, x.dtype, x.zeros)


def scaled(x: Affine, c: torch.Tensor, cache: TermCache | None = None) -> Affine | None:
    s = x.out_size()
    if c.dim() == 1 and s is not None and c.shape[0] != s:
        return None
    terms = {}
    for node, t in x.terms.items():
        if c.dim() == 0 and float(c) == 1.0:
            terms[node] = t  # 1.0 * t == t bitwise
        elif c.dim() == 0 and float(c) == 0.0 and t.dim() == 2 and math.isfinite(float(dense(t).sum())):
            # (a finite sum means every element is finite; an overflowing sum only costs the fast path)
            terms[node] = torch.zeros((), dtype=f64).expand(t.shape)  # 0 * finite == 0, no copy
        else:
            terms[node] = (cache or TermCache()).scale(c, t)
    bias = None if x.bias is None else c * x.bias
    zeros = set(x.zeros)
    if not bool(c.all()):  # only a zero factor makes new zero terms
        zeros |= {n for n, t in terms.items() if not bool(dense(t).any())}
    return without_zero_terms(Affine(terms, bias, x.dtype, zeros))


def composed(weight: torch.Tensor, bias: torch.Tensor | None, x: Affine) -> Affine | None:
    """``linear(x, W, b)`` where x has exactly one term."""
    (node, t), = x.terms.items()
    t = _exact64(t)
    w = weight.detach().to(f64)
    if t.dim() == 0:
        new = w * t
    elif t.dim() == 1:
        if t.shape[0] != w.shape[1]:
            return None
        new = w * t[None, :]
    else:
        if t.shape[0] != w.shape[1]:
            return None
        new = w @ t
    b = None if bias is None else bias.detach().to(f64)
    if x.bias is not None:
        shift = w @ x.bias if x.bias.dim() == 1 else w.sum(1) * x.bias
        b = shift if b is None else b + shift
    return Affine({node: new}, b, weight.dtype)


def _term_cost(t: torch.Tensor, out: int) -> int:
    if t.dim() == 2:
        return t.numel()
    if t.dim() == 1:
        return t.numel()
    return 0 if float(t) == 1.0 else out


def _shape_key(n: fx.Node):
    """Nodes with equal keys have equal shapes: the shape recorded by shape propagation when fuse had
    example inputs; else structural: norms and activations keep their input's shape, a Linear keeps the
    leading dims and sets the last."""
    meta = n.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape"):
        return ("shape", tuple(meta.shape))
    lin = as_linear(n)
    if lin is not None:
        return (_shape_key(lin.input), lin.out_features)
    if (as_layer_norm(n) is not None or activation_key(n) is not None) and input_of(n) is not None:
        return _shape_key(input_of(n))
    return n


def without_zero_terms(f: Affine) -> Affine:
    """Drop terms that are exactly zero (e.g. ``(1 - lam) * z_i`` at lam == 1), where a remaining term has the
    same shape, so dropping cannot change how the sum broadcasts. ``0 * finite == 0`` exactly."""
    if not f.zeros:
        return f
    keep = {n: t for n, t in f.terms.items() if n not in f.zeros}
    keys = {_shape_key(n) for n in keep}
    terms = {n: t for n, t in f.terms.items() if n in keep or _shape_key(n) not in keys}
    return Affine(terms, f.bias, f.dtype, f.zeros & terms.keys()) if terms else f


class FormKey:
    """Hashable identity of a form: equal when terms (same bases, same order) and bias are bitwise equal.
    Hashes a cheap fingerprint and compares the tensors only on a hash match."""

    __slots__ = ("tensors", "_hash")

    def __init__(self, f: Affine, order):
        items = sorted(f.terms.items(), key=lambda kv: order.get(kv[0], -1))
        self.tensors = [(n, dense(t)) for n, t in items] + [(None, f.bias), (None, f.dtype)]
        self._hash = hash(tuple((id(n), fingerprint(t) if isinstance(t, torch.Tensor) else t)
                                for n, t in self.tensors))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        if not isinstance(other, FormKey) or len(self.tensors) != len(other.tensors):
            return False
        for (n, a), (m, b) in zip(self.tensors, other.tensors):
            if n is not m:
                return False
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                if not bitwise_equal(a, b):
                    return False
            elif a is not b and (isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) or a != b):
                return False
        return True


def form_cost(f: Affine) -> tuple[int, int]:
    """(multiply-adds per token, ops) to compute the form as emitted by ``materialize``."""
    out = f.out_size() or 1
    macs = sum(_term_cost(t, out) for t in f.terms.values())
    ops = sum(1 for t in f.terms.values() if t.dim() > 0 or float(t) != 1.0)
    ops += len(f.terms) - 1
    macs += (len(f.terms) - 1) * out
    has_matrix = any(t.dim() == 2 for t in f.terms.values())
    bias = normalized_bias(f)
    if bias is not None and not (has_matrix and bias.dim() == 1):
        ops += 1
        macs += out
    return macs, ops


def normalized_bias(f: Affine) -> torch.Tensor | None:
    """The bias as emitted: None when exactly zero, a vector when a Linear will absorb a scalar bias."""
    b = f.bias
    if b is None or not bool(b.any()):
        return None
    out = f.out_size()
    if b.dim() == 0 and out is not None and any(t.dim() == 2 for t in f.terms.values()):
        return b * torch.ones(out, dtype=f64)
    return b


