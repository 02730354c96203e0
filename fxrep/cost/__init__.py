"""Whether widening pays at the real shapes (used by the widen patterns).

The cost model comes with the fuse call's options (``ctx.options.cost_model``): by default a table of kernel
times shipped with fxrep, which makes ``fuse`` a deterministic function of the model, its inputs and options;
``fuse(..., autotune=True)`` times both forms on this machine instead, and ``fuse(..., decisions=...)``
replays recorded decisions. Each group is decided once per shape ``key`` in a ``fuse`` call, and the decisions
are recorded in the report (``report.decisions``).
"""

from __future__ import annotations

import torch

from .group import Attention, Elementwise, Linear, WidenGroup, attention_group, mlp_group
from .models import (
    MARGIN,
    MIN_MACS,
    Decision,
    MeasuredCostModel,
    ReplayedCostModel,
    TableCostModel,
    best_of,
    cost_model_for,
)
from .table import KernelTable, load_table

__all__ = ["Attention", "Decision", "Elementwise", "KernelTable", "Linear", "MARGIN", "MIN_MACS",
           "MeasuredCostModel", "ReplayedCostModel", "TableCostModel", "WidenGroup", "attention_group",
           "best_of",
           "cost_model_for", "decide", "load_table", "mlp_group", "unpriced"]


def unpriced(ctx, shape: tuple | None) -> str | None:
    """Why a group with input ``shape`` is widened without pricing (no shape known, or the model runs on
    another device than the CPU the cost model describes), or None when it can be priced."""
    device = torch.device(ctx.options.device)
    if device.type != "cpu":
        return f"not priced: the model runs on {device}, the cost model describes the CPU"
    if shape is None:
        return "not priced: no input shape known (pass example_inputs)"
    return None


def decide(ctx, group: WidenGroup) -> Decision | str:
    """The decision for ``group`` (made once per shape key and recorded in ``ctx.decisions``), or a note
    saying why a group too small to matter is widened unpriced."""
    model = ctx.options.cost_model
    if group.macs < model.min_macs:
        return f"not priced: {group.macs:,} multiply-adds, under {model.min_macs:,}: one op makes fewer calls"
    if group.key not in ctx.decisions:
        ctx.decisions[group.key] = model.price(group)
    return ctx.decisions[group.key]
