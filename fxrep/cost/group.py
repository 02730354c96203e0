"""A widen group as the cost models see it: the input shape, and the ops of both forms, in shapes only.

Widening keeps the FLOPs, so whether one wide op beats B narrow ones depends on the shape and the machine
(one GEMM of hidden width 3072 over 17 tokens ran slower on the project's CPU than two of 1536). A
``WidenGroup`` lists each form as primitive ops (``Linear``, ``Attention``, ``Elementwise``) that a table of
measured kernel times can price, and can build both forms on random tensors for a cost model that times them.
Its ``key`` names the group by shapes alone: groups of one shape are decided once per ``fuse`` call, and a
recorded decision replays for any group with that key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Linear:
    """``rows`` x ``in_features`` input times a weight of ``out_features`` rows."""

    rows: int
    in_features: int
    out_features: int

    @property
    def macs(self) -> int:
        return self.rows * self.in_features * self.out_features


@dataclass(frozen=True)
class Attention:
    """``batch_heads`` independent (``tokens`` x ``tokens``) softmax attentions with q/k head width ``dqk``
    and value head width ``dv`` (the two products and the softmax; the projections are Linears)."""

    batch_heads: int
    tokens: int
    dqk: int
    dv: int

    @property
    def macs(self) -> int:
        return self.batch_heads * self.tokens * self.tokens * (self.dqk + self.dv)


@dataclass(frozen=True)
class Elementwise:
    """An activation or a sum over ``elements`` values."""

    kind: str  # "activation" or "add"
    elements: int

    @property
    def macs(self) -> int:
        return 0


def _rows(shape: tuple) -> int:
    return int(torch.Size(shape[:-1]).numel())


@dataclass(frozen=True)
class WidenGroup:
    """One candidate for widening: ``apart`` and ``wide`` list the ops of each form; ``key`` is its shape
    signature; ``build()`` returns the two forms as zero-argument callables on random tensors (for timing)."""

    kind: str
    key: str
    shape: tuple
    dtype: torch.dtype
    branches: int
    apart: tuple
    wide: tuple
    build: Callable | None = field(default=None, compare=False, repr=False)

    @property
    def macs(self) -> int:
        """Multiply-adds of the branches (the same in both forms)."""
        return sum(op.macs for op in self.apart)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _random(*shape, dtype):
    return torch.randn(shape, dtype=dtype) / max(1.0, shape[-1] ** 0.5)


def mlp_group(shape: tuple, hidden: list, out_features: int, activation: tuple, dtype) -> WidenGroup:
    """``sum_i Wout_i act(W_i x + b_i)`` against ``Wout act(W x + b)`` with ``W`` the rows of all ``W_i``;
    ``activation`` is (a hashable name of it, the function)."""
    name, act = activation
    rows, d = _rows(shape), shape[-1]
    apart = tuple(op for h in hidden for op in (Linear(rows, d, h), Elementwise("activation", rows * h),
                                                Linear(rows, h, out_features)))
    apart += (Elementwise("add", rows * out_features),) * (len(hidden) - 1)
    total = sum(hidden)
    wide = (Linear(rows, d, total), Elementwise("activation", rows * total),
            Linear(rows, total, out_features))
    key = (f"mlp in={tuple(shape)} {_dtype_name(dtype)} hidden={'+'.join(map(str, hidden))} "
           f"out={out_features} act={name}")

    def build():
        x = torch.randn(shape, dtype=dtype)
        w1 = [_random(h, d, dtype=dtype) for h in hidden]
        b1 = [torch.zeros(h, dtype=dtype) for h in hidden]
        w2 = [_random(out_features, h, dtype=dtype) for h in hidden]
        wide1, wide_b, wide2 = torch.cat(w1), torch.cat(b1), torch.cat(w2, 1)
        F = torch.nn.functional
        return (lambda: sum(F.linear(act(F.linear(x, a, b)), c) for a, b, c in zip(w1, b1, w2)),
                lambda: F.linear(act(F.linear(x, wide1, wide_b)), wide2))
    return WidenGroup("mlp", key, tuple(shape), dtype, len(hidden), apart, wide, build)


def _attention_ops(rows: int, batch: int, tokens: int, d: int, heads: int, dqk: int, dv: int,
                   out: int | None) -> tuple:
    ops = (Linear(rows, d, heads * dqk), Linear(rows, d, heads * dqk), Linear(rows, d, heads * dv),
           Attention(batch * heads, tokens, dqk, dv))
    return ops + (Linear(rows, heads * dv, out),) if out is not None else ops


def attention_group(shape: tuple, branches: list, merge: Callable, out_features: int | None, options: dict,
                    dtype) -> WidenGroup:
    """Each branch's attention and the Linears that read it, against the merged attention and one Linear.

    ``branches``: (params, heads, output width) per branch; ``merge()`` gives the merged (params, heads,
    output width, each branch's columns), built only when the group is timed (it follows from the branches).
    ``out_features`` None: the branches have no output projection, their outputs are summed as they are
    (the merged form sums its column slices). Masks are left out (they cost the same either way);
    ``options`` are ``is_causal`` and ``tokens_first``."""
    from ..ops import multi_head_attention

    tokens_first = bool(options.get("tokens_first"))
    tokens = shape[0] if tokens_first else (shape[-2] if len(shape) > 1 else 1)
    rows, d = _rows(shape), shape[-1]
    batch = max(1, rows // max(1, tokens))
    widths = [(h, p["q_weight"].shape[0] // h, p["v_weight"].shape[0] // h) for p, h, _ in branches]
    apart = tuple(op for h, dqk, dv in widths for op in _attention_ops(rows, batch, tokens, d, h, dqk, dv,
                                                                       out_features))
    summed = out_features if out_features is not None else max(h * dv for h, _, dv in widths)
    apart += (Elementwise("add", rows * summed),) * (len(branches) - 1)
    heads = sum(h for h, _, _ in widths)
    dqk, dv = max(w[1] for w in widths), max(w[2] for w in widths)
    wide = _attention_ops(rows, batch, tokens, d, heads, dqk, dv, out_features)
    if out_features is None:
        wide += (Elementwise("add", rows * summed),) * (len(branches) - 1)
    per_branch = "+".join(f"{h}x{q}/{v}" for h, q, v in widths)
    key = (f"attention in={tuple(shape)} {_dtype_name(dtype)} heads={per_branch} out={out_features} "
           f"causal={bool(options.get('is_causal'))} tokens_first={tokens_first}")

    def build():
        x = torch.randn(shape, dtype=dtype)

        def form(params, num_heads, width, columns=None):
            p = {k: (_random(*v.shape, dtype=dtype) if v is not None else None) for k, v in params.items()}
            if out_features is not None:
                w = _random(out_features, width, dtype=dtype)
                return lambda: torch.nn.functional.linear(
                    multi_head_attention(x, **p, num_heads=num_heads, **options), w)
            if columns is None:
                return lambda: multi_head_attention(x, **p, num_heads=num_heads, **options)
            return lambda: sum(multi_head_attention(x, **p, num_heads=num_heads, **options)[..., c]
                               for c in columns)
        apart_forms = [form(*b) for b in branches]
        return (lambda: sum(f() for f in apart_forms)), form(*merge())
    return WidenGroup("attention", key, tuple(shape), dtype, len(branches), apart, wide, build)
