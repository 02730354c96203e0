"""``merge_affine``: every chain of Linears, scales and sums between two nonlinear ops becomes the fewest Linears.

This one pattern implements scale folding (LayerScale, constant weights, ``1/B`` averages, join coefficients),
the merging of Linears that read the same tensor and are summed, and the collapse of joined pre-activations
(math doc sections 3 and 4). It works on *affine forms*: for a node whose value is affine in some other
nodes (its *bases*), the form is ``sum_k T_k base_k + bias`` where each ``T_k`` is a scalar (``c * I``), a
vector (``diag(v)``) or a matrix, all in float64. Forms are computed in topological order through

    linear(a, W, b)     add / sub / neg     mul / div by a scalar or per-channel constant

A node is a *stop* node (it must exist in the rewritten graph) when something other than these ops reads
it; its form is then materialized as ``linear(base_1, T_1, bias) + ... ``. The nodes whose forms feed stop
nodes form *regions*; a region is rewritten only when that lowers its multiply-adds per token (or keeps them
and lowers the op count), so the pattern never makes a model slower in its own cost model. Stop nodes of one
region with bitwise-identical forms are materialized once: that is what makes ``B`` joined branches at
``lam == 1`` read one pre-activation.

Before (a joined 2-branch pre-activation at lam = 1)::

    z1 = linear(n, W1, b1); z2 = linear(n, W2, b2)
    m = (z1 + z2) / 2
    a1 = z1 * 0.0 + m * 1.0;  a2 = z2 * 0.0 + m * 1.0      # (1 - lam) z_i + lam * mean

After::

    a = linear(n, (W1 + W2) / 2, (b1 + b2) / 2)           # read by both branches' GELU, then CSE'd
"""

from __future__ import annotations

import math

import torch
from torch import fx

from .. import algebra
from ..ir import (
    ADD_TARGETS,
    DIV_TARGETS,
    MUL_TARGETS,
    NEG_TARGETS,
    SUB_TARGETS,
    activation_key,
    as_layer_norm,
    as_linear,
    bitwise_equal,
    const_node,
    constant_tensor,
    emit_linear,
    fingerprint,
    merge_origins,
    mutation_hazards,
    scalar_or_channel,
)
from ..registry import Match

f64 = torch.float64


class Affine:
    """``sum_k terms[base_k] @ base_k + bias`` (see module docstring).

    Terms are float64, except the weight of a Linear whose form is just that Linear, and one exact product of
    it (``_scale_term``): they stay in the model's dtype (exactly representable in float64) until arithmetic
    needs them, through ``_exact64``. Most Linears are never merged, and converting every weight of a large
    model each analysis would dominate fuse time.
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


class _Sum:
    """A left-to-right sum of same-shape matrix terms, computed when first needed, into one float64 buffer.

    ``((W1 + W2) + W3) + W4`` over a chain of add nodes needs only the last sum (unless an intermediate one is
    itself a stop node): the intermediate float64 matrices are never made, and the sum is accumulated in place,
    which gives the same bits as the pairwise float64 sums (same order, each step rounded once)."""

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


def _dense(t):
    """A term as a tensor (its dtype kept)."""
    return t.value() if isinstance(t, _Sum) else t


def _exact64(t) -> torch.Tensor:
    """A term as a float64 tensor (model-dtype values are exactly representable)."""
    t = _dense(t)
    return t if t.dtype == f64 else t.to(f64)


def _add_terms(a, b):
    if a.dim() == 2 and b.dim() == 2:
        if a.shape != b.shape:
            return None
        return _Sum((a.parts if isinstance(a, _Sum) else [a]) + [_dense(b)])  # same order as a + b
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
            self._results[key] = (t, _scale_term(c, t))
        return self._results[key][1]


def _scale_term(c: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``c * t`` (``c`` per output row when a vector). In ``t``'s dtype when ``t`` is still a model-dtype weight
    and ``c`` is exactly representable there: one correctly rounded product, the bits of the float64 route
    (``algebra.exact_product``), at half the memory traffic of a LayerScale folded into a large weight."""
    rows = c if c.dim() == 0 or t.dim() <= 1 else c[:, None]
    if t.dtype != f64:
        c_model = rows.to(t.dtype)
        if torch.equal(c_model.to(f64), rows):
            product = algebra.exact_product(t, c_model)
            if product is not None:
                return product
    return rows * _exact64(t)  # (converting first is faster than a mixed-dtype multiply)


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
    return _without_zero_terms(Affine(terms, bias, x.dtype or y.dtype, zeros))


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
        elif c.dim() == 0 and float(c) == 0.0 and t.dim() == 2 and math.isfinite(float(_dense(t).sum())):
            # (a finite sum means every element is finite; an overflowing sum only costs the fast path)
            terms[node] = torch.zeros((), dtype=f64).expand(t.shape)  # 0 * finite == 0, no copy
        else:
            terms[node] = (cache or TermCache()).scale(c, t)
    bias = None if x.bias is None else c * x.bias
    zeros = set(x.zeros)
    if not bool(c.all()):  # only a zero factor makes new zero terms
        zeros |= {n for n, t in terms.items() if not bool(_dense(t).any())}
    return _without_zero_terms(Affine(terms, bias, x.dtype, zeros))


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


def affine_analysis(ctx) -> AffineAnalysis:
    """The AffineAnalysis of the current graph state, shared by the patterns of one sweep."""
    return ctx.cached("affine", lambda: AffineAnalysis(ctx.graph, ctx.memo("affine"), hazards=ctx.mutation_hazards()))


class AffineAnalysis:
    """Forms, stop nodes and regions of one graph state.

    ``memo`` (a dict kept for the whole fuse call, see ``FuseContext.memo``) lets a new analysis reuse the
    form of every node whose operands did not change since the last one: after a rewrite, only the forms
    downstream of the new nodes are recomputed, which keeps fusing large models close to linear in time.
    """

    def __init__(self, graph: fx.Graph, memo: dict | None = None, seed_stops: bool = True, hazards=None):
        self.order = {n: i for i, n in enumerate(graph.nodes)}
        self.hazards = mutation_hazards(graph) if hazards is None else hazards
        self._memo = {} if memo is None else memo
        for n in [n for n in self._memo if n not in self.order]:
            del self._memo[n]  # erased nodes: their forms can never be asked for again
        self._cache = TermCache()
        # Stop nodes grow to a fixed point (the set only grows, so this ends). It starts from the nodes read
        # by an op that can never carry a form, which are stop nodes of every fixed point that gives them a
        # form (and stop membership of a node without a form changes nothing). Starting from no stop nodes
        # gives the same result (tested) but first computes forms straight through the residual stream, which
        # changes after every rewrite upstream and so defeats the memo.
        stop: set = _structural_stops(graph) if seed_stops else set()
        while True:
            forms, through = self._forms(graph, stop)
            new_stop = set(stop)
            for n in forms:
                if any(n not in through.get(u, ()) for u in n.users):
                    new_stop.add(n)
            if new_stop == stop:
                break
            stop = new_stop
        del self._cache  # the forms keep what they use; drop the rest
        self.forms, self.through, self.stop = forms, through, stop
        self.regions = self._regions()
        self.region_at = {region["stops"][0]: region for region in self.regions}
        self.owner = {}
        for region in self.regions:
            for f, cone in region["cones"].items():
                for n in cone:
                    self.owner.setdefault(n, set()).add(f)

    # -- forms ---------------------------------------------------------------------------------------
    def _forms(self, graph, stop):
        forms: dict = {}
        through: dict = {}
        used: set = set()

        def operand(n, a, dtype=None):
            if isinstance(a, fx.Node) and a in forms and a not in stop:
                used.add(a)
                return forms[a]
            if isinstance(a, fx.Node):
                c = scalar_or_channel(a, dtype) if a.op == "get_attr" else None
                return c if c is not None else Affine.base(a)
            return scalar_or_channel(a, dtype)

        for n in graph.nodes:
            if n in self.hazards:
                continue  # written in place, or read after such a write: an opaque value
            key, keep_alive = _dependency_key(n, forms, stop)
            entry = self._memo.get(n)
            if entry is None or entry[0] != key:
                used.clear()
                entry = (key, self._form(n, forms, stop, operand), frozenset(used), keep_alive)
                self._memo[n] = entry
            _, f, reads, _ = entry
            if f is not None:
                forms[n] = f
                if reads:
                    through[n] = set(reads)
        return forms, through

    def _form(self, n, forms, stop, operand):
        lin = as_linear(n)
        if lin is not None:
            a = lin.input
            if a in forms and a not in stop and len(forms[a].terms) == 1:
                (t,) = forms[a].terms.values()
                o, i = lin.weight.shape
                cheap = t.dim() < 2 or o * t.shape[1] <= o * i + i * t.shape[1]
                if cheap:
                    f = composed(lin.weight, lin.bias, forms[a])
                    if f is not None:
                        operand(n, a)
                        return f
            b = None if lin.bias is None else lin.bias.detach().to(f64)
            return Affine({a: lin.weight.detach()}, b, lin.weight.dtype)  # converted when needed

        op = _arith_kind(n)
        if op is None:
            return None
        args = list(n.args)
        if not any(isinstance(a, fx.Node) and a in forms and a not in stop for a in args):
            return None  # no operand carries a Linear form: nothing to merge here
        dtype = next((forms[a].dtype for a in args if isinstance(a, fx.Node) and a in forms), None)
        if dtype is None:
            return None
        if op == "neg":
            x = operand(n, args[0], dtype)
            return scaled(x, torch.tensor(-1.0, dtype=f64), self._cache) if isinstance(x, Affine) else None
        if len(args) != 2 or set(n.kwargs) - {"alpha"}:
            return None
        x, y = operand(n, args[0], dtype), operand(n, args[1], dtype)
        if x is None or y is None:
            return None
        if "alpha" in n.kwargs:
            alpha = scalar_or_channel(n.kwargs["alpha"])
            if alpha is None or alpha.dim() != 0 or op not in ("add", "sub"):
                return None
            y = scaled(y, alpha, self._cache) if isinstance(y, Affine) else y * alpha
        if op in ("add", "sub"):
            sign = 1.0 if op == "add" else -1.0
            if isinstance(x, Affine) and isinstance(y, Affine):
                return plus(x, y, sign, self._cache)
            if isinstance(x, Affine):
                return shifted(x, y * sign)
            if isinstance(y, Affine):
                f = scaled(y, torch.tensor(sign, dtype=f64), self._cache)
                return shifted(f, x) if f is not None else None
            return None
        if op == "mul":
            if isinstance(x, Affine) and not isinstance(y, Affine):
                return scaled(x, y, self._cache)
            if isinstance(y, Affine) and not isinstance(x, Affine):
                return scaled(y, x, self._cache)
            return None
        if op == "div" and isinstance(x, Affine) and not isinstance(y, Affine):
            if bool((y == 0).any()):
                return None
            return scaled(x, 1.0 / y, self._cache)
        return None

    # -- regions -------------------------------------------------------------------------------------
    def _regions(self):
        parent: dict = {}

        def find(a):
            while parent.setdefault(a, a) is not a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        cones = {}
        self.stop = {f for f in self.stop if f in self.forms}
        for f in self.stop:
            cone, todo = {f}, [f]
            while todo:
                n = todo.pop()
                for a in self.through.get(n, ()):
                    if a not in cone and a not in self.stop:
                        cone.add(a)
                        todo.append(a)
            cones[f] = cone
            for n in cone:
                parent[find(n)] = find(f)
        groups: dict = {}
        for f in sorted(self.stop, key=self.order.__getitem__):
            groups.setdefault(find(f), []).append(f)
        return [{"stops": stops, "cones": {f: cones[f] for f in stops}} for stops in groups.values()]


def _structural_stops(graph: fx.Graph) -> set:
    """Nodes with a user that is neither a Linear nor a scale/sum op: no form can ever read through it."""
    return {n for n in graph.nodes if any(as_linear(u) is None and _arith_kind(u) is None for u in n.users)}


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
    if (as_layer_norm(n) is not None or activation_key(n) is not None) and isinstance(n.args[0], fx.Node):
        return _shape_key(n.args[0])
    return n


def _without_zero_terms(f: Affine) -> Affine:
    """Drop terms that are exactly zero (e.g. ``(1 - lam) * z_i`` at lam == 1), where a remaining term has the
    same shape, so dropping cannot change how the sum broadcasts. ``0 * finite == 0`` exactly."""
    if not f.zeros:
        return f
    keep = {n: t for n, t in f.terms.items() if n not in f.zeros}
    keys = {_shape_key(n) for n in keep}
    terms = {n: t for n, t in f.terms.items() if n in keep or _shape_key(n) not in keys}
    return Affine(terms, f.bias, f.dtype, f.zeros & terms.keys()) if terms else f


def _arith_kind(n: fx.Node) -> str | None:
    if n.op == "call_function":
        for kind, targets in (("add", ADD_TARGETS), ("sub", SUB_TARGETS), ("mul", MUL_TARGETS),
                              ("div", DIV_TARGETS), ("neg", NEG_TARGETS)):
            if n.target in targets:
                if kind == "div" and n.kwargs.get("rounding_mode") is not None:
                    return None
                return kind
    if n.op == "call_method" and n.target in ("add", "sub", "mul", "div", "neg"):
        if n.target == "div" and n.kwargs.get("rounding_mode") is not None:
            return None
        return str(n.target)
    return None


def _dependency_key(n: fx.Node, forms: dict, stop: set) -> tuple[tuple, list]:
    """Everything the form of ``n`` is computed from: its op, its constant arguments, the form objects of
    operands that carry one, and the identity and version of the tensors behind ``get_attr`` operands.
    Returns the key and the tensors it names by ``id`` (kept alive with the key so no id is reused)."""
    parts: list = [n.op, n.target]
    keep: list = []
    # a Linear's weight and bias are read by value: a duplicate get_attr of the same attribute (merged by
    # CSE after a rewrite emitted it again) must not make the Linear's form, and every form downstream, new
    lin = as_linear(n)
    by_value = set() if lin is None else \
        {a for a in (*n.args[1:], *n.kwargs.values()) if isinstance(a, fx.Node) and a is not lin.input}

    def visit(a):
        if isinstance(a, fx.Node):
            if a in forms and a not in stop:
                parts.append(forms[a])
            elif a.op == "get_attr":
                t = constant_tensor(a)
                keep.append(t)
                node = "attr" if a in by_value else a
                parts.append((node, a.target, id(t), getattr(t, "_version", None)))
            else:
                parts.append(a)
        else:
            parts.append((type(a), repr(a)))
        return a

    fx.node.map_aggregate(n.args, visit)
    for name in sorted(n.kwargs):
        parts.append(name)
        fx.node.map_aggregate(n.kwargs[name], visit)
    return tuple(parts), keep


class _FormKey:
    """Hashable identity of a form: equal when terms (same bases, same order) and bias are bitwise equal.
    Hashes a cheap fingerprint and compares the tensors only on a hash match."""

    __slots__ = ("tensors", "_hash")

    def __init__(self, f: Affine, order):
        items = sorted(f.terms.items(), key=lambda kv: order.get(kv[0], -1))
        self.tensors = [(n, _dense(t)) for n, t in items] + [(None, f.bias), (None, f.dtype)]
        self._hash = hash(tuple((id(n), fingerprint(t) if isinstance(t, torch.Tensor) else t)
                                for n, t in self.tensors))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        if not isinstance(other, _FormKey) or len(self.tensors) != len(other.tensors):
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


def _form_cost(f: Affine) -> tuple[int, int]:
    """(multiply-adds per token, ops) to compute the form as emitted by ``_materialize``."""
    out = f.out_size() or 1
    macs = sum(_term_cost(t, out) for t in f.terms.values())
    ops = sum(1 for t in f.terms.values() if t.dim() > 0 or float(t) != 1.0)
    ops += len(f.terms) - 1
    macs += (len(f.terms) - 1) * out
    has_matrix = any(t.dim() == 2 for t in f.terms.values())
    bias = _normalized_bias(f)
    if bias is not None and not (has_matrix and bias.dim() == 1):
        ops += 1
        macs += out
    return macs, ops


def _node_cost(n: fx.Node, f: Affine) -> int:
    lin = as_linear(n)
    if lin is not None:
        return lin.weight.numel()
    return f.out_size() or 1


def _normalized_bias(f: Affine) -> torch.Tensor | None:
    """The bias as emitted: None when exactly zero, a vector when a Linear will absorb a scalar bias."""
    b = f.bias
    if b is None or not bool(b.any()):
        return None
    out = f.out_size()
    if b.dim() == 0 and out is not None and any(t.dim() == 2 for t in f.terms.values()):
        return b * torch.ones(out, dtype=f64)
    return b


def _materialize(graph: fx.Graph, f: Affine, ctx, order, hint: str, origins) -> fx.Node:
    items = sorted(f.terms.items(), key=lambda kv: order.get(kv[0], -1))
    bias = _normalized_bias(f)
    parts = []
    for base, t in items:
        b = ctx.resolve(base)
        t = _dense(t)
        if t.dim() == 2:
            absorb = bias is not None and bias.dim() == 1
            parts.append(emit_linear(graph, b, t, bias if absorb else None, f.dtype, hint, origins))
            if absorb:
                bias = None
        elif t.dim() == 1:
            parts.append(graph.call_function(torch.mul, (b, const_node(graph, t.to(f.dtype), hint + "_scale"))))
        else:
            parts.append(b if float(t) == 1.0 else graph.call_function(torch.mul, (b, float(t))))
    acc = parts[0]
    for p in parts[1:]:
        acc = graph.call_function(torch.add, (acc, p))
    if bias is not None:
        c = float(bias) if bias.dim() == 0 else const_node(graph, bias.to(f.dtype), hint + "_bias")
        acc = graph.call_function(torch.add, (acc, c))
    return acc


class MergeAffine:
    name = "merge_affine"
    phase = "fuse"

    def match(self, node, ctx):
        analysis = affine_analysis(ctx)
        region = analysis.region_at.get(node)
        return self._evaluate(region, analysis) if region is not None else None

    def _evaluate(self, region, analysis):
        nodes = set().union(*region["cones"].values())
        macs_before = sum(_node_cost(n, analysis.forms[n]) for n in nodes)
        ops_before = len(nodes)
        seen = {}
        for f in region["stops"]:
            seen.setdefault(_FormKey(analysis.forms[f], analysis.order), analysis.forms[f])
        costs = [_form_cost(form) for form in seen.values()]
        macs_after = sum(c[0] for c in costs)
        ops_after = sum(c[1] for c in costs)
        if macs_after < macs_before or (macs_after == macs_before and ops_after < ops_before):
            linears = [n for n in nodes if as_linear(n) is not None]
            summary = (f"{len(linears)} Linear + {ops_before - len(linears)} scale/sum ops -> "
                       f"{sum(1 for f in seen.values() for t in f.terms.values() if t.dim() == 2)} Linear"
                       f" ({ops_after} ops)")
            return Match(sorted(nodes, key=analysis.order.__getitem__),
                         {"region": region, "analysis": analysis,
                          "report": {"macs_before": macs_before, "macs_after": macs_after}}, summary)
        return None

    def replace(self, match, ctx):
        region, analysis = match.data["region"], match.data["analysis"]
        made: dict = {}
        graph = ctx.graph
        params_before = sum(as_linear(n).weight.numel() for n in match.nodes if as_linear(n) is not None)
        params_after = 0
        for f in region["stops"]:
            form = analysis.forms[f]
            key = _FormKey(form, analysis.order)
            if key not in made:
                cone = region["cones"][f]
                origins = merge_origins([n for n in sorted(cone, key=analysis.order.__getitem__)
                                         if as_linear(n) is not None])
                with graph.inserting_before(f):
                    made[key] = _materialize(graph, form, ctx, analysis.order, f.name, origins)
                params_after += sum(t.numel() for t in form.terms.values() if t.dim() == 2)
            ctx.replace_node(f, made[key])
        out = dict(match.data["report"])
        out.update(params_before=params_before, params_after=params_after)
        return out
