"""Core ATen decompositions folded back into the ops they came from, in a graph from
``ExportedProgram.run_decompositions()``, before ``spellings`` rewrites ATen overloads to torch functions.
One front-end pattern per fold (``CORE_ATEN_FOLDS``, in the order the engine runs them):

- ``view(addmm(b, view(x, [M, C]), permute(w, [1, 0])), [..., F])`` (and ``mm`` without a bias, ``t(w)``) is
  ``linear(x, w, b)``;
- ``view(bmm(view(clone?(expand(A)), [BH, n, k]), view(clone?(expand(B)), [BH, k, m])), [..., n, m])``, with
  expands that only broadcast batch axes, is ``matmul(A, B)`` (``linear(A, w)`` where B is ``w^T``);
- ``where(rows of s all -inf, 0, _softmax(s))`` (SDPA's decomposed softmax) is ``_softmax(s)`` where ``s`` is
  an unmasked q-k product, or one plus a constant mask with no infinite value: for finite inputs no row of it
  is -inf throughout, so the two agree;
- ``view(cat(xs), [len(xs), *s])`` of tensors of one shape ``s`` is ``stack(xs)`` (timm's branch sums);
- ``native_layer_norm(x, shape, w, b, eps)[0]``, its mean and rstd unread, is
  ``layer_norm(x, shape, w, b, eps)``;
- ``add(linear(x, w), b)`` with a constant ``b`` of ``w``'s row count (a Linear on a permuted input decomposes
  to a batched matmul and a separate bias add) is ``linear(x, w, b)``.

Every fold checks the shapes export recorded (``meta["val"]``, possibly symbolic: sizes must be provably
equal) and that the inner nodes have no other reader; anything else stays as it is.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..ir import bind
from ..ir.evaluate import evaluate
from ..ir.recorded import recorded_shape
from ..ir.recorded import same_shape as _same
from ..ir.targets import SPECS
from ..pattern import FRONTEND, Match

aten = torch.ops.aten
_VIEWS = (*SPECS["view"].aten, *SPECS["reshape"].aten)  # view, reshape, _unsafe_view


def _only_reader(node, reader) -> bool:
    return isinstance(node, fx.Node) and list(node.users) == [reader]


def _call(node, *targets):
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets:
        return node
    return None


def _arg(node, name: str):
    """Argument ``name`` of an ATen call, by the overload's schema (``input`` is its ``self``)."""
    return (bind(node) or {}).get(name)


def _transposed_weight(node):
    """``w`` where ``node`` is ``permute(w, [1, 0])`` or ``t(w)`` of a 2-d ``w``."""
    if _call(node, aten.t.default) is not None or \
            (_call(node, aten.permute.default) is not None and
             list(_arg(node, "dims")) in ([1, 0], [-1, -2])):
        return _arg(node, "input")
    return None


def _linear(out):
    """(x, w, b) if ``out`` is a flattened ``addmm``/``mm`` reshaped back, else None."""
    mm = _call(_arg(out, "input"), aten.addmm.default, aten.mm.default)
    if mm is None or not _only_reader(mm, out):
        return None
    found = _matrix_product(mm)
    flat_in = _call(found[0], *_VIEWS) if found is not None else None
    if flat_in is None or not _only_reader(flat_in, mm):
        return None
    x, weight, bias = _arg(flat_in, "input"), found[1], found[2]
    return _checked(out, x, weight, bias)


def _matrix_product(mm):
    """(x2d, w, b) if ``mm`` is ``addmm(b, x2d, w^T)`` or ``mm(x2d, w^T)`` with unit scales, else None."""
    a = bind(mm) or {}
    if a.get("beta", 1) != 1 or a.get("alpha", 1) != 1:
        return None
    if mm.target is aten.addmm.default:
        bias, flat, weight_t = a["input"], a["mat1"], a["mat2"]
    else:
        bias, flat, weight_t = None, a["input"], a["mat2"]
    weight = _transposed_weight(weight_t)
    return (flat, weight, bias) if weight is not None else None


def _checked(out, x, weight, bias):
    """(x, w, b) if ``out`` has the shape ``linear(x, w, b)`` has, else None."""
    w_shape = recorded_shape(weight)
    if w_shape is None or len(w_shape) != 2 or recorded_shape(x) is None:
        return None
    if not _same(recorded_shape(out), recorded_shape(x)[:-1] + (w_shape[0],)) or \
            (bias is not None and not _same(recorded_shape(bias), (w_shape[0],))):
        return None
    return x, weight, bias


def _unexpanded(node, reader):
    """(A, expanded shape) where ``node`` is ``view(clone?(expand(A)))`` read only by ``reader`` and the
    expand only broadcasts A's batch axes (what ``matmul`` does itself), else None."""
    flat = _call(node, *_VIEWS)
    if flat is None or not _only_reader(flat, reader):
        return None
    inner = _arg(flat, "input")
    if _call(inner, aten.clone.default) is not None and _only_reader(inner, flat):
        inner = _arg(inner, "input")
    if _call(inner, aten.expand.default) is None or len(inner.users) != 1:
        return None
    a = _arg(inner, "input")
    sa, se = recorded_shape(a), recorded_shape(inner)
    if sa is None or se is None or len(sa) > len(se) or not _same(sa[-2:], se[-2:]):
        return None
    lead = se[len(se) - len(sa):-2]
    if not all(statically_known_true(d == 1) or statically_known_true(d == e) for d, e in zip(sa[:-2], lead)):
        return None
    return a, se


def _matmul(out):
    """(target, args): ``matmul(A, B)``, or ``linear(A, w)`` where B is ``w^T`` of a 2-d weight, if ``out`` is
    a batched matmul flattened to ``bmm`` and reshaped back, else None."""
    bmm = _call(_arg(out, "input"), aten.bmm.default)
    if bmm is None or not _only_reader(bmm, out):
        return None
    found_a, found_b = _unexpanded(_arg(bmm, "input"), bmm), _unexpanded(_arg(bmm, "mat2"), bmm)
    if found_a is None or found_b is None:
        return None
    (a, ea), (b, eb) = found_a, found_b
    if len(ea) != len(eb) or not _same(ea[:-2], eb[:-2]) or not _same(recorded_shape(out), ea[:-1] + eb[-1:]):
        return None
    weight = _transposed_weight(b)
    if (weight is not None and recorded_shape(weight) is not None and len(recorded_shape(weight)) == 2
            and _same(recorded_shape(a), ea)):
        return aten.linear.default, (a, weight)
    return aten.matmul.default, (a, b)


def _biased_linear(add):
    """(x, w, b) if ``add`` is ``add(linear(x, w), b)`` with ``b`` a parameter or constant of shape
    (out_features,) and the Linear read only by the add, else None."""
    a = bind(add) or {}
    if a.get("alpha", 1) != 1:
        return None
    lin, bias = a["input"], a["other"]
    if _call(lin, aten.linear.default) is None or not _only_reader(lin, add) or \
            _arg(lin, "bias") is not None or not isinstance(bias, fx.Node) or \
            bias.op not in ("get_attr", "placeholder"):
        return None
    x, weight = _arg(lin, "input"), _arg(lin, "weight")
    w_shape, b_shape = recorded_shape(weight), recorded_shape(bias)
    if w_shape is None or len(w_shape) != 2 or not _same(b_shape, (w_shape[0],)):
        return None
    value, b_value = lin.meta.get("val"), bias.meta.get("val")
    if not isinstance(value, torch.Tensor) or not isinstance(b_value, torch.Tensor) or \
            value.dtype != b_value.dtype:
        return None
    return x, weight, bias


def _stack(out):
    """``stack(xs)`` if ``out`` is ``view(cat(xs), [len(xs), *s])`` of tensors of one shape ``s``, else
    None."""
    cat = _call(_arg(out, "input"), aten.cat.default)
    if cat is None or not _only_reader(cat, out) or _arg(cat, "dim") != 0:
        return None
    xs = list(_arg(cat, "tensors"))
    shapes = [recorded_shape(x) for x in xs]
    if any(not _same(sh, shapes[0]) for sh in shapes) or not _same(recorded_shape(out),
                                                                   (len(xs),) + shapes[0]):
        return None
    return aten.stack.default, (xs,)


def _safe_softmax(node):
    """``softmax(s, d)`` where ``node`` is ``where(rows of s all -inf, 0, softmax(s, d))``, the decomposition
    of SDPA's softmax, and ``s`` is a product of q and k (no mask: no row is -inf throughout), else None."""
    if _call(node, aten.where.self) is None:
        return None
    a = bind(node)
    cond, zeros, sm = a["condition"], a["input"], a["other"]
    if (_call(sm, aten._softmax.default) is None or _arg(sm, "half_to_float")
            or _call(zeros, aten.full_like.default) is None or _arg(zeros, "input") is not sm
            or _arg(zeros, "fill_value") != 0):
        return None
    any_ = _call(_call(cond, aten.logical_not.default) and _arg(cond, "input"), aten.any.dim)
    not_eq = _call(any_ and _arg(any_, "input"), aten.logical_not.default)
    eq = _call(not_eq and _arg(not_eq, "input"), aten.eq.Scalar)
    s = _arg(sm, "input")
    if eq is None or _arg(eq, "input") is not s or _arg(eq, "other") != float("-inf") or \
            _arg(any_, "dim") != _arg(sm, "dim") or _arg(any_, "keepdim") is not True:
        return None
    if _call(s, aten.add.Tensor) is not None:  # a mask with no -inf anywhere leaves every row finite
        terms = (_arg(s, "input"), _arg(s, "other"))
        products = [t for t, m in (terms, terms[::-1]) if _finite_constant(m)]
        s = products[0] if products else s
    return sm if _is_product(s) else None


def _is_product(s) -> bool:
    while _call(s, *_VIEWS) is not None:
        s = _arg(s, "input")
    return _call(s, aten.bmm.default, aten.matmul.default) is not None


def _finite_constant(node) -> bool:
    """Whether ``node`` is computed from constants alone (Hugging Face's sdpa models build an all-True boolean
    mask from ``arange``; core ATen adds it as ``where(mask, 0, -inf)``) and has no infinite value. Broadcasts
    (``expand``, possibly to a symbolic batch) keep the values, so they are looked through."""
    values: dict = {}

    def value(n):
        if not isinstance(n, fx.Node):
            return n
        if n not in values:
            if (len(values) > 64 or n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload)
                    or torch.Tag.nondeterministic_seeded in n.target.tags):
                raise LookupError(n.name)
            if n.target is aten.expand.default:
                values[n] = value(_arg(n, "input"))
            else:
                values[n] = evaluate(n, value)
        return values[n]

    try:
        v = value(node)
    except Exception:  # noqa: BLE001 - not a constant fxrep can evaluate: not folded
        return False
    return isinstance(v, torch.Tensor) and v.is_floating_point() and bool(torch.isfinite(v).all())


@dataclass(frozen=True)
class Fold:
    """What one fold found: the readers of each node of ``olds`` read ``target(*args)`` instead (a new node
    per old one; ``target`` None: ``args[0]``, a node the graph has). ``consumed``: the decomposition's nodes,
    which keeps the matches of one sweep apart."""

    olds: tuple
    target: object
    args: tuple
    consumed: tuple


class FoldPattern:
    """A front-end pattern: ``find(node)`` returns a ``Fold`` rooted at ``node`` or None. It never mutates the
    graph; ``replace`` builds the folded op and hands the old nodes to the engine, which erases them and the
    decomposition they leave without readers."""

    phase = FRONTEND

    def __init__(self, name: str, find: Callable[[fx.Node], Fold | None], summary: str):
        self.name, self._find, self._summary = name, find, summary

    def match(self, node, ctx):
        found = self._find(node)
        return Match(found.consumed, data=found, summary=self._summary) if found is not None else None

    def replace(self, match, ctx):
        fold = match.data
        args = fx.node.map_arg(fold.args, ctx.resolve)
        for old in fold.olds:
            if fold.target is None:
                new = args[0]
            else:
                with ctx.graph.inserting_before(old):
                    new = ctx.graph.call_function(fold.target, args)
                new.meta = dict(old.meta)
            ctx.replace_node(old, new)

    def __repr__(self) -> str:
        return f"FoldPattern({self.name!r})"


def _flattened_product(node) -> Fold | None:
    """``linear`` where ``node`` reshapes back a flattened ``addmm``/``mm``; ``matmul`` (or ``linear``) where
    it reshapes back a ``bmm``; ``stack`` where it reshapes a ``cat``."""
    if _call(node, *_VIEWS) is None:
        return None
    found = _linear(node)
    if found is not None:
        return Fold((node,), aten.linear.default, found, (node, _arg(node, "input")))
    found = _matmul(node) or _stack(node)
    return Fold((node,), *found, (node, _arg(node, "input"))) if found is not None else None


def _softmax_fold(node) -> Fold | None:
    sm = _safe_softmax(node)
    return Fold((node,), None, (sm,), (node,)) if sm is not None else None


def _layer_norm(node) -> Fold | None:
    """``layer_norm`` where ``node`` is ``native_layer_norm`` read only for its output (``[0]``)."""
    if _call(node, aten.native_layer_norm.default) is None or not node.users or \
            not all(_call(u, operator.getitem) is not None and u.args[1] == 0 for u in node.users):
        return None
    a = bind(node)
    args = tuple(a[k] for k in ("input", "normalized_shape", "weight", "bias", "eps"))
    return Fold(tuple(node.users), aten.layer_norm.default, args, (node, *node.users))


def _linear_2d(node) -> Fold | None:
    """``linear`` where ``node`` is ``addmm``/``mm`` of a 2-d input (a classifier head)."""
    if _call(node, aten.addmm.default, aten.mm.default) is None:
        return None
    found = _matrix_product(node)
    if found is None or _checked(node, *found) is None:
        return None
    return Fold((node,), aten.linear.default, found, (node,))


def _bias_add(node) -> Fold | None:
    found = _biased_linear(node) if _call(node, aten.add.Tensor) is not None else None
    return Fold((node,), aten.linear.default, found, (node, _arg(node, "input"))) if found is not None \
        else None


# in this order: a Linear on rows flattened by a view folds whole before its 2-d product could fold alone,
# and a bias add folds into a Linear that the folds before it made
CORE_ATEN_FOLDS = (
    FoldPattern("fold_flattened_products", _flattened_product,
                "a flattened addmm/mm, bmm or cat reshaped back, as linear, matmul or stack"),
    FoldPattern("fold_safe_softmax", _softmax_fold, "SDPA's decomposed softmax of an unmasked product"),
    FoldPattern("fold_native_layer_norm", _layer_norm, "native_layer_norm read for its output only"),
    FoldPattern("fold_2d_linear", _linear_2d, "addmm/mm of a 2-d input as linear"),
    FoldPattern("fold_bias_add", _bias_add, "a Linear's separate bias add into the Linear"),
)
