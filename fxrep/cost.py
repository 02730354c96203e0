"""Whether widening pays at the real shapes: both forms of a widen group timed on the example inputs' shape.

Widening keeps the FLOPs, so whether one wide op beats B narrow ones depends on the shape and the machine:
measured here, a hand-widened ``vit_small_patch16_18x2_224`` ran at 0.90x the parallel model at 17 tokens and
1.15x at 197. When ``fxrep.fuse`` has example inputs (so ShapeProp recorded the group input's shape), the
widen patterns time the group as it is (each branch's op and the Linears that read it) against the widened op
and one Linear of the summed width, on random tensors of that shape, interleaved, and keep the branches apart
where the wide form is clearly slower. Without a shape, or for a model that runs on another device than the
CPU the timing would run on, they widen as before and the report says it was not timed.

Timings are cached per shape signature for the whole ``fuse`` call (a ViT's blocks repeat one shape), so a
12-block model times each kind of group once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from .ir import known_shape
from .ops import multi_head_attention

# keep branches apart when the wide form is more than 2% slower (closer calls are timing noise: widen)
MARGIN = 1.02
# groups smaller than this (multiply-adds of the branches) are not timed: at that size one op does the same
# work in fewer calls, and timing noise (a few percent, more on a busy machine) would decide instead
MIN_MACS = 2 ** 24
ROUNDS, WARMUP = 9, 2
DEVICE_KEY = "fxrep_device"  # gm.meta: the device the fused model will run on (set by the engine)


@dataclass(frozen=True)
class Timing:
    apart_ms: float
    wide_ms: float
    shape: tuple
    branches: int

    @property
    def pays(self) -> bool:
        return self.wide_ms <= self.apart_ms * MARGIN

    def describe(self) -> str:
        return (f"{self.wide_ms:.3f} ms as one op vs {self.apart_ms:.3f} ms as {self.branches} branches "
                f"({self.wide_ms / self.apart_ms:.2f}x, timed on input {tuple(self.shape)})")


def input_shape(ctx, x: fx.Node) -> tuple | None:
    """The recorded shape of ``x`` when widening can be timed for it: known from ShapeProp, and the model runs
    on the CPU. None otherwise (today's behaviour: widen, untimed)."""
    device = ctx.gm.meta.get(DEVICE_KEY, torch.device("cpu"))
    return known_shape(x) if torch.device(device).type == "cpu" else None


def too_small(macs: int) -> str | None:
    return f"not timed: {macs:,} multiply-adds, too small to time reliably" if macs < MIN_MACS else None


def untimed_note(ctx) -> str:
    device = torch.device(ctx.gm.meta.get(DEVICE_KEY, torch.device("cpu")))
    if device.type != "cpu":
        return f"not timed: the model runs on {device}, timing would run on the CPU"
    return "not timed: no input shape known (pass example_inputs)"


def _best_of(forms: dict) -> dict:
    """Fastest of ``ROUNDS`` runs of each zero-argument callable, interleaved, in milliseconds."""
    best = {name: float("inf") for name in forms}
    with torch.inference_mode():
        for _ in range(WARMUP):
            for f in forms.values():
                f()
        for _ in range(ROUNDS):
            for name, f in forms.items():
                start = time.perf_counter()
                f()
                best[name] = min(best[name], (time.perf_counter() - start) * 1e3)
    return best


def _timed(ctx, key: tuple, shape: tuple, branches: int, build) -> Timing:
    memo = ctx.memo("widening_timings")
    if key not in memo:
        apart, wide = build()
        t = _best_of({"apart": apart, "wide": wide})
        memo[key] = Timing(t["apart"], t["wide"], shape, branches)
    return memo[key]


def _random(*shape, dtype):
    return torch.randn(shape, dtype=dtype) / max(1.0, shape[-1] ** 0.5)


def _rows(shape: tuple) -> int:
    return int(torch.Size(shape[:-1]).numel())


def mlp_timing(ctx, shape: tuple, hidden: list, out_features: int, activation: tuple, dtype) -> Timing | str:
    """``sum_i Wout_i act(W_i x + b_i)`` against ``Wout act(W x + b)`` with ``W`` the rows of all ``W_i``;
    ``activation`` is (its ``ir.activation_key``, the function). A string says why it was not timed."""
    key_of_activation, activation = activation
    d = shape[-1]
    small = too_small(_rows(shape) * sum(h * (d + out_features) for h in hidden))
    if small:
        return small

    def build():
        x = torch.randn(shape, dtype=dtype)
        w1 = [_random(h, d, dtype=dtype) for h in hidden]
        b1 = [torch.zeros(h, dtype=dtype) for h in hidden]
        w2 = [_random(out_features, h, dtype=dtype) for h in hidden]
        wide1, wide_b, wide2 = torch.cat(w1), torch.cat(b1), torch.cat(w2, 1)
        return (lambda: sum(F.linear(activation(F.linear(x, a, b)), c) for a, b, c in zip(w1, b1, w2)),
                lambda: F.linear(activation(F.linear(x, wide1, wide_b)), wide2))
    return _timed(ctx, ("mlp", shape, tuple(hidden), out_features, key_of_activation, dtype), shape, len(hidden),
                  build)


def attention_timing(ctx, shape: tuple, branches: list, merge, out_features: int, options: dict,
                     dtype) -> Timing | str:
    """Each branch's attention and the Linear that reads it, against the merged attention and one Linear.
    ``branches``: (params, heads, output width) per branch; ``merge()`` gives the merged (params, heads,
    output width), built only when the group is timed (it follows from the branches). Masks are left out
    (they cost the same either way); ``options`` are ``is_causal`` and ``tokens_first``. A string says why it
    was not timed."""
    tokens = shape[0] if options.get("tokens_first") else (shape[-2] if len(shape) > 1 else 1)
    # per row of the input: the q/k/v projections, the output Linear, and the two attention products
    projections = sum(sum(v.shape[0] for k, v in p.items() if k.endswith("weight")) * shape[-1] + w * out_features
                      + tokens * (p["q_weight"].shape[0] + w) for p, _, w in branches)
    small = too_small(_rows(shape) * projections)
    if small:
        return small

    def shapes(params):
        return tuple((k, tuple(v.shape) if v is not None else None) for k, v in sorted(params.items()))

    def build():
        x = torch.randn(shape, dtype=dtype)

        def form(params, heads, width):
            p = {k: (_random(*v.shape, dtype=dtype) if v is not None else None) for k, v in params.items()}
            w = _random(out_features, width, dtype=dtype)
            return lambda: F.linear(multi_head_attention(x, **p, num_heads=heads, **options), w)
        apart = [form(*b) for b in branches]
        wide = form(*merge())
        return (lambda: sum(f() for f in apart)), wide
    key = ("attention", shape, tuple((shapes(p), h, w) for p, h, w in branches), out_features,
           tuple(sorted(options.items())), dtype)
    return _timed(ctx, key, shape, len(branches), build)
