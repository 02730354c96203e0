"""Cost models: whether a widen group is merged into one wide op or its branches stay apart.

- ``TableCostModel`` (the default) prices both forms from kernel times shipped with fxrep: deterministic, the
  same graph on any machine and under any load.
- ``MeasuredCostModel`` (``fuse(..., autotune=True)``) times both forms on this machine at the real shape, as
  cuDNN's benchmark mode does: it fits this machine best, and its decisions vary with load.
- ``ReplayedCostModel`` (``fuse(..., decisions=report.decisions)``) gives back recorded decisions without
  timing anything, so a measured fuse can be reproduced exactly.

Every model widens where the wide form is at most ``margin`` times the time of the branches (ties and
near-ties widen: one op is fewer calls), and widens groups under ``min_macs`` multiply-adds unpriced.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .group import WidenGroup
from .table import KernelTable, load_table

MARGIN = 1.02
MIN_MACS = 2 ** 24


@dataclass(frozen=True)
class Decision:
    """How one widen group (named by its shape ``key``) was decided, with the two forms' times in ms."""

    key: str
    widen: bool
    source: str  # "table", "measured" or "replayed"
    apart_ms: float | None = None
    wide_ms: float | None = None
    branches: int | None = None

    def describe(self) -> str:
        if self.apart_ms is None or self.wide_ms is None:
            return f"{'widened' if self.widen else 'kept apart'} as recorded ({self.source})"
        verb = {"table": "predicted", "measured": "measured", "replayed": "recorded"}.get(self.source,
                                                                                          self.source)
        return (f"{verb}: {self.wide_ms:.3f} ms as one op vs {self.apart_ms:.3f} ms as {self.branches} "
                f"branches ({self.wide_ms / self.apart_ms:.2f}x)")

    def as_dict(self) -> dict:
        return {"widen": self.widen, "source": self.source, "apart_ms": self.apart_ms,
                "wide_ms": self.wide_ms,
                "branches": self.branches}


def _decision(group: WidenGroup, apart_ms: float, wide_ms: float, margin: float, source: str) -> Decision:
    return Decision(group.key, wide_ms <= apart_ms * margin, source, apart_ms, wide_ms, group.branches)


class TableCostModel:
    """Both forms priced as the sum of their kernels' times in a ``KernelTable``."""

    name = "table"

    def __init__(self, table: KernelTable | None = None, margin: float = MARGIN, min_macs: int = MIN_MACS):
        self.table = table or load_table()
        self.margin, self.min_macs = margin, min_macs

    def describe(self) -> str:
        return f"kernel-time table {self.table.name}"

    def price(self, group: WidenGroup) -> Decision:
        apart = sum(self.table.time_ms(op) for op in group.apart)
        wide = sum(self.table.time_ms(op) for op in group.wide)
        return _decision(group, apart, wide, self.margin, "table")


def best_of(forms: dict, rounds: int, warmup: int) -> dict:
    """Fastest of ``rounds`` runs of each zero-argument callable, interleaved, in milliseconds."""
    best = {name: float("inf") for name in forms}
    with torch.inference_mode():
        for _ in range(warmup):
            for f in forms.values():
                f()
        for _ in range(rounds):
            for name, f in forms.items():
                start = time.perf_counter()
                f()
                best[name] = min(best[name], (time.perf_counter() - start) * 1e3)
    return best


class MeasuredCostModel:
    """Both forms timed on this machine on random tensors of the group's shape (fastest of ``rounds``
    interleaved runs after ``warmup``). ``timer(forms) -> {name: ms}`` replaces the clock (tests)."""

    name = "measured"

    def __init__(self, margin: float = MARGIN, min_macs: int = MIN_MACS, rounds: int = 9, warmup: int = 2,
                 timer: Callable[[dict], dict] | None = None):
        self.margin, self.min_macs = margin, min_macs
        self.timer = timer or (lambda forms: best_of(forms, rounds, warmup))

    def describe(self) -> str:
        return "measured on this machine (autotune=True)"

    def price(self, group: WidenGroup) -> Decision:
        apart, wide = group.build()
        t = self.timer({"apart": apart, "wide": wide})
        return _decision(group, t["apart"], t["wide"], self.margin, "measured")


def _as_decision(key: str, value) -> Decision:
    """A recorded decision: a ``Decision``, its ``as_dict()`` (e.g. read back from JSON), or a bool."""
    if isinstance(value, Decision):
        return value
    if isinstance(value, bool):
        return Decision(key, value, "replayed")
    if isinstance(value, Mapping) and isinstance(value.get("widen"), bool):
        return Decision(key, value["widen"], value.get("source", "replayed"), value.get("apart_ms"),
                        value.get("wide_ms"), value.get("branches"))
    raise TypeError(f"decision {key!r}: expected a Decision, its as_dict() or a bool, not {value!r}")


class ReplayedCostModel:
    """Recorded decisions given back as they were, without timing; groups they do not name go to
    ``fallback``."""

    name = "replayed"

    def __init__(self, decisions: Mapping, fallback):
        self.decisions = {k: _as_decision(k, v) for k, v in decisions.items()}
        self.fallback = fallback
        self.margin, self.min_macs = fallback.margin, fallback.min_macs

    def describe(self) -> str:
        return f"{len(self.decisions)} recorded decision(s), else {self.fallback.describe()}"

    def price(self, group: WidenGroup) -> Decision:
        recorded = self.decisions.get(group.key)
        if recorded is None:
            return self.fallback.price(group)
        return Decision(group.key, recorded.widen, "replayed", recorded.apart_ms, recorded.wide_ms,
                        recorded.branches or group.branches)


def cost_model_for(autotune: bool = False, decisions: Mapping | None = None):
    """The cost model ``fuse`` uses: the table by default, timing with ``autotune``, recorded ``decisions``
    replayed first."""
    model = MeasuredCostModel() if autotune else TableCostModel()
    return ReplayedCostModel(decisions, model) if decisions else model
