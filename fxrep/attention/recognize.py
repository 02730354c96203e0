"""Reading one attention out of a traced graph: the softmax (or SDPA) anchor, its logits as a sum of scaled
``q @ k^T`` terms, and the q/k/v tensors traced back through views and scalar scales to their Linears.
Structure only: the head layout is read by ``fxrep.attention.probe``."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from ..ir import arith_kind, as_linear, as_sdpa, as_softmax, input_of
from ..ir.effects import is_view
from ..ir.products import einsum_kind, einsum_operands, matmul_operands
from ..ir.readers import (
    as_float_cast,
    as_masked_scores,
    is_softmax,
    scalar_constant,
    scale_op,
)


class NotAttention(Exception):
    """Raised while recognizing; its message becomes the reason of a Skip."""


def describe(n: fx.Node) -> str:
    t = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
    return f"'{n.name}' ({t})"


class Chain:
    """A q/k/v tensor traced back through views (and scalar scales) to the Linear that produced it."""

    def __init__(self, end: fx.Node):
        self.end, self.nodes, self.factor, self.scale_nodes = end, [], 1.0, set()
        n = end
        while True:
            lin = as_linear(n)
            if lin is not None:
                self.linear = lin
                break
            scale = scale_op(n)
            if scale is not None:
                self.nodes.append(n)
                self.scale_nodes.add(n)
                n, f = scale
                self.factor *= f
                continue
            if not is_view(n) or input_of(n) is None:
                raise NotAttention(f"{describe(end)} is not a view of a Linear output (found {describe(n)})")
            self.nodes.append(n)
            n = input_of(n)
        self.nodes.reverse()


@dataclass
class LogitTerm:
    """``coef * (q @ k^T)``; ``k_transposed``: the key chain ends in k^T (matmul) rather than k (einsum,
    SDPA)."""

    coef: float
    q: Chain
    k: Chain
    k_transposed: bool


@dataclass
class Logits:
    """A softmax input as ``sum_t coef_t * (q_t @ k_t^T) + sum_m coef_m * m``: product terms keyed by their
    matmul node, and additive terms that are not products (an attention mask, a position bias)."""

    terms: dict = field(default_factory=dict)   # matmul node -> LogitTerm
    nodes: set = field(default_factory=set)
    masks: dict = field(default_factory=dict)   # additive node -> coefficient

    def add(self, product: fx.Node, q: fx.Node, k: fx.Node, k_transposed: bool, coef: float) -> None:
        if product not in self.terms:
            self.terms[product] = LogitTerm(0.0, Chain(q), Chain(k), k_transposed)
        self.terms[product].coef += coef

    def merge(self, other: Logits) -> None:
        self.nodes |= other.nodes
        for product, t in other.terms.items():
            if product in self.terms:
                self.terms[product].coef += t.coef
            else:
                self.terms[product] = t
        for m, c in other.masks.items():
            self.masks[m] = self.masks.get(m, 0.0) + c

    def mask(self) -> fx.Node | None:
        """The one additive mask, added exactly once (docs/identities.md §6), or None; raises otherwise."""
        masks = {m: c for m, c in self.masks.items() if c != 0.0}
        if not masks:
            return None
        if len(masks) > 1:
            raise NotAttention("softmax input adds several terms that are not q @ k^T products: "
                               + ", ".join(describe(m) for m in masks))
        (m, c), = masks.items()
        # joined branches add it with coefficients (1 - lam) + lam * B / B, from float32 join constants
        if abs(c - 1.0) > 1e-6:
            raise NotAttention(f"softmax input adds {describe(m)} scaled by {c:g}: a mask must be added once")
        return m


def parse_logits(n: fx.Node, coef: float, out: Logits, depth: int = 0) -> None:
    """Add ``coef * n`` to ``out`` as q @ k^T terms (through scalar scales, sums, differences, negation)."""
    if depth > 64:
        raise NotAttention("softmax input expression is too deep")
    out.nodes.add(n)
    operands = matmul_operands(n)
    if operands is not None:
        out.add(n, *operands, True, coef)
        return
    if einsum_kind(n) == "logits":
        out.add(n, *einsum_operands(n), False, coef)
        return
    scale = scale_op(n)
    if scale is not None:
        parse_logits(scale[0], coef * scale[1], out, depth + 1)
        return
    masked = as_masked_scores(n)
    if masked is not None:  # timm's maybe_add_mask(scores, mask)
        parse_logits(masked[0], coef, out, depth + 1)
        if isinstance(masked[1], fx.Node):
            out.masks[masked[1]] = out.masks.get(masked[1], 0.0) + coef
        return
    kind = arith_kind(n)
    if kind in ("add", "sub") and len(n.args) == 2 and not n.kwargs:
        for a, c in zip(n.args, (coef, -coef if kind == "sub" else coef)):
            if isinstance(a, fx.Node) and scalar_constant(a) is None:
                _parse_addend(a, c, out, depth + 1)
            elif scalar_constant(a) is None:
                raise NotAttention(f"softmax input {describe(n)} adds a non-constant")
            # a scalar constant shifts every logit of a row equally: softmax does not see it
        return
    if kind == "neg" and input_of(n) is not None:
        parse_logits(input_of(n), -coef, out, depth + 1)
        return
    raise NotAttention(f"softmax input {describe(n)} is not a sum of scaled q @ k^T products "
                       "(an attention mask or bias?)")


def _parse_addend(a: fx.Node, coef: float, out: Logits, depth: int) -> None:
    """A term of a sum of logits: q @ k^T products (parsed), or else an additive mask or bias."""
    part = Logits()
    try:
        parse_logits(a, coef, part, depth)
    except NotAttention:
        out.masks[a] = out.masks.get(a, 0.0) + coef
        return
    out.merge(part)


_PRECISION = {torch.float16: 0, torch.bfloat16: 0, torch.float32: 1, torch.float64: 2}


def softmax_input(p: fx.Node, model_dtype: torch.dtype) -> fx.Node:
    """The input of a softmax over the key axis, computed in the model's dtype or a wider one (Hugging Face's
    eager attention takes the softmax in float32 and casts back: the same values up to rounding)."""
    view = as_softmax(p)
    if view is None:
        raise NotAttention(f"{describe(p)} is not a softmax")
    if view.dtype is not None and not (isinstance(view.dtype, torch.dtype) and
                                       _PRECISION.get(view.dtype, -1) >= _PRECISION.get(model_dtype, 3)):
        raise NotAttention(f"softmax in {view.dtype}, narrower than the model's {model_dtype}")
    if view.dim not in (-1, 3):
        raise NotAttention(f"softmax over dim {view.dim}, not the key axis")
    return view.input


def _probabilities(p: fx.Node) -> fx.Node:
    """The softmax under a cast back to the model dtype (``softmax(s, dtype=float32).to(q.dtype)``), or
    ``p``."""
    inner = as_float_cast(p)
    return inner if inner is not None and is_softmax(inner) else p


def is_anchor(n: fx.Node) -> bool:
    """Where an attention ends: an SDPA call, or ``softmax(...) @ v`` (matmul or einsum)."""
    if as_sdpa(n) is not None:
        return True
    operands = matmul_operands(n)
    if operands is not None and is_softmax(_probabilities(operands[0])):
        return True
    return einsum_kind(n) == "pv" and is_softmax(_probabilities(einsum_operands(n)[0]))


class Candidate:
    """One recognized attention: logit terms, value chain, output node; or the reason it is not one."""

    def __init__(self, anchor: fx.Node):
        self.anchor = anchor
        self.logits = Logits()
        sdpa = as_sdpa(anchor)
        if sdpa is not None:
            self._read_sdpa(sdpa)
        else:
            p, v = einsum_operands(anchor) if einsum_kind(anchor) == "pv" else matmul_operands(anchor)
            self.softmax = _probabilities(p)
            self.cast = p if p is not self.softmax else None
            self.value = Chain(v)
            parse_logits(softmax_input(self.softmax, self.value.linear.weight.dtype), 1.0, self.logits)
            self.scale = 1.0
            self.attn_mask, self.is_causal = self.logits.mask(), False
            self.mask_stand_in = 0.0  # what the mask is replaced by when the lift is verified

    def _read_sdpa(self, sdpa) -> None:
        if sdpa.attn_mask is not None and not isinstance(sdpa.attn_mask, fx.Node):
            raise NotAttention(f"attention mask {sdpa.attn_mask!r} is not a tensor")
        if not isinstance(sdpa.is_causal, (bool, fx.Node)):
            raise NotAttention(f"is_causal={sdpa.is_causal!r} is neither a bool nor an input")
        self.attn_mask, self.is_causal, self.mask_stand_in = sdpa.attn_mask, sdpa.is_causal, None
        self.cast = None
        if sdpa.dropout_p != 0.0:
            raise NotAttention(f"attention dropout is active (dropout_p={sdpa.dropout_p})")
        if sdpa.enable_gqa:
            raise NotAttention("grouped-query attention")
        self.scale = sdpa.scale
        if self.scale is not None and not isinstance(self.scale, (int, float)):
            raise NotAttention("SDPA scale is not a constant")
        self.logits.terms[self.anchor] = LogitTerm(1.0, Chain(sdpa.query), Chain(sdpa.key), False)
        self.value = Chain(sdpa.value)
        self.softmax = None

    def probe_overrides(self) -> dict:
        """How the float64 verification evaluates dtype changes: as the identity (a float32 softmax and its
        cast back compute the same values, rounded)."""
        if self.cast is None and (self.softmax is None or as_softmax(self.softmax).dtype is None):
            return {}
        sm = as_softmax(self.softmax)
        out = {self.softmax: lambda env: torch.softmax(env[sm.input], dim=sm.dim)}
        if self.cast is not None:
            out[self.cast] = lambda env: env[self.softmax]
        return out

    def nodes(self) -> set:
        out = {self.anchor} | set(self.value.nodes) | {self.value.linear.node}
        if self.cast is not None:
            out.add(self.cast)
        if self.softmax is not None:
            out |= {self.softmax} | self.logits.nodes
        for t in self.logits.terms.values():
            out |= set(t.q.nodes) | set(t.k.nodes) | {t.q.linear.node, t.k.linear.node}
        return out
