"""The affine analysis of a graph: the form of every node that is affine in other nodes, the *stop* nodes that
must exist after a rewrite, and the *regions* of nodes whose forms feed the same stop nodes (see
``fxrep.patterns.affine`` for how ``merge_affine`` uses them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from .. import algebra
from ..ir import arith_kind, as_linear
from ..ir.effects import mutation_hazards
from ..ir.readers import constant_tensor, scalar_or_channel
from .forms import Affine, TermCache, composed, plus, scaled, shifted

f64 = algebra.f64


def affine_analysis(ctx) -> AffineAnalysis:
    """The AffineAnalysis of the current graph state, shared by the patterns of one sweep (``merge_affine``,
    the widening patterns): computed once per graph state."""
    return ctx.analysis(_analyze)


def _analyze(ctx) -> AffineAnalysis:
    return AffineAnalysis(ctx.graph, ctx.memo(AffineAnalysis), hazards=ctx.mutation_hazards())


@dataclass
class Region:
    """Stop nodes whose forms read overlapping nodes (``cones``: stop node -> the nodes its form reads
    through), so they are rewritten together."""

    stops: list
    cones: dict


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
        self.region_at = {region.stops[0]: region for region in self.regions}
        self.owner = {}
        for region in self.regions:
            for f, cone in region.cones.items():
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
            return self._linear_form(n, lin, forms, stop, operand)
        op = arith_kind(n)
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
        return self._binary_form(op, x, y)

    def _linear_form(self, n, lin, forms, stop, operand):
        """A Linear composes with its input's form when that has one term and composing costs no more
        multiply-adds; else it starts a form of its own (its weight kept in the model dtype)."""
        a = lin.input
        if a in forms and a not in stop and len(forms[a].terms) == 1:
            (t,) = forms[a].terms.values()
            o, i = lin.weight.shape
            if t.dim() < 2 or o * t.shape[1] <= o * i + i * t.shape[1]:
                f = composed(lin.weight, lin.bias, forms[a])
                if f is not None:
                    operand(n, a)
                    return f
        b = None if lin.bias is None else lin.bias.detach().to(f64)
        return Affine({a: lin.weight.detach()}, b, lin.weight.dtype)  # converted when needed

    def _binary_form(self, op, x, y):
        """``x op y`` where each side is an Affine form or a float64 constant."""
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
        return [Region(stops, {f: cones[f] for f in stops}) for stops in groups.values()]


def _structural_stops(graph: fx.Graph) -> set:
    """Nodes with a user that is neither a Linear nor a scale/sum op: no form can ever read through it."""
    return {n for n in graph.nodes if any(as_linear(u) is None and arith_kind(u) is None for u in n.users)}


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
