"""Kernel times measured once and shipped with fxrep, and the interpolation that prices any shape from them.

A table holds the median time of three kernels on a grid of shapes (``benchmarks/calibrate_cost.py`` writes
it): ``F.linear`` by (rows, in, out), ``F.scaled_dot_product_attention`` by (batch x heads, tokens, head
width), and an activation and an add by element count. A shape between grid points is priced by
interpolating log-time linearly in the log2 of each coordinate; below the grid the smallest grid value is
used (small kernels cost their call overhead); above it, time grows with the work. Pricing is a pure function
of the shape and the table: the same everywhere, whatever the machine is doing.
"""

from __future__ import annotations

import bisect
import functools
import json
import math
from importlib import resources

from .group import Attention, Elementwise, Linear

DEFAULT_TABLE = "cpu_x86_64.json"
# how the work of each kernel grows with each coordinate (time scales with it above the grid)
_EXPONENTS = {"linear": (1, 1, 1), "attention": (1, 2, 1), "activation": (1,), "add": (1,)}


class KernelTable:
    """Measured kernel times (milliseconds) on grids of shapes, with their interpolation."""

    def __init__(self, data: dict):
        self.meta = dict(data.get("meta", {}))
        self._grids = {}
        for kind in _EXPONENTS:
            entries = {tuple(point): ms for *point, ms in data[kind]}
            axes = [sorted({p[i] for p in entries}) for i in range(len(_EXPONENTS[kind]))]
            self._grids[kind] = (axes, entries)

    @property
    def name(self) -> str:
        m = self.meta
        return f"{m.get('source', 'table')} ({m.get('machine', '?')}, {m.get('threads', '?')} threads, " \
               f"torch {m.get('torch', '?')}, {m.get('date', '?')})"

    def time_ms(self, op) -> float:
        """Predicted milliseconds of one primitive op (``group.Linear``, ``Attention`` or ``Elementwise``)."""
        if isinstance(op, Linear):
            return self._interpolate("linear", (op.rows, op.in_features, op.out_features))
        if isinstance(op, Attention):
            return self._interpolate("attention", (op.batch_heads, op.tokens, max(op.dqk, op.dv)))
        if isinstance(op, Elementwise):
            return self._interpolate(op.kind, (op.elements,))
        raise TypeError(f"no kernel time for {op!r}")

    def _corner(self, kind: str, point: tuple) -> float:
        """The table's time at a grid point; a point left out of the grid (too slow to measure) is the nearest
        point with fewer rows (the first coordinate), scaled by the work."""
        axes, entries = self._grids[kind]
        if point in entries:
            return entries[point]
        lower = [v for v in axes[0] if v < point[0]]
        for first in reversed(lower):
            smaller = (first, *point[1:])
            if smaller in entries:
                return entries[smaller] * (point[0] / first) ** _EXPONENTS[kind][0]
        raise KeyError(f"the cost table has no {kind} time at or below {point}")

    def _interpolate(self, kind: str, point: tuple) -> float:
        axes, _ = self._grids[kind]
        scale = 1.0
        brackets = []  # per axis: (low grid value, high grid value, weight of high)
        for value, axis, exponent in zip(point, axes, _EXPONENTS[kind]):
            value = max(1, value)
            if value <= axis[0]:
                brackets.append((axis[0], axis[0], 0.0))
            elif value >= axis[-1]:
                scale *= (value / axis[-1]) ** exponent
                brackets.append((axis[-1], axis[-1], 0.0))
            else:
                i = bisect.bisect_right(axis, value)
                lo, hi = axis[i - 1], axis[i]
                brackets.append((lo, hi, math.log2(value / lo) / math.log2(hi / lo)))
        log_time = 0.0
        for corner in range(2 ** len(brackets)):
            weight, coords = 1.0, []
            for i, (lo, hi, w) in enumerate(brackets):
                high = corner >> i & 1
                weight *= w if high else 1.0 - w
                coords.append(hi if high else lo)
            if weight:
                log_time += weight * math.log(self._corner(kind, tuple(coords)))
        return math.exp(log_time) * scale


@functools.cache
def load_table(name: str = DEFAULT_TABLE) -> KernelTable:
    """A table shipped in ``fxrep/cost/`` (read once; it is fxrep's own data, not a user's)."""
    text = resources.files(__package__).joinpath(name).read_text()
    return KernelTable(json.loads(text))
