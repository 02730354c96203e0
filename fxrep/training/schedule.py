"""The progressive-joining schedule: lam as a function of the training step."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class JoinSchedule:
    """``lam`` = 0 for the first ``warmup`` fraction of ``total_steps``, then ramps to 1 over the next
    ``ramp`` fraction (``shape`` "linear" or "cosine"), then stays 1 to the end, so the trained model is fully
    joined and ``fxrep.fuse`` collapses it exactly."""

    total_steps: int
    warmup: float = 0.1
    ramp: float = 0.6
    shape: str = "cosine"

    def __post_init__(self):
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not (0 <= self.warmup and 0 <= self.ramp and self.warmup + self.ramp <= 1):
            raise ValueError(f"need 0 <= warmup, 0 <= ramp and warmup + ramp <= 1; got {self.warmup}, "
                             f"{self.ramp}")
        if self.shape not in ("linear", "cosine"):
            raise ValueError(f"shape must be 'linear' or 'cosine', got {self.shape!r}")

    def __call__(self, step: int) -> float:
        start = self.warmup * self.total_steps
        length = self.ramp * self.total_steps
        if step < start:
            return 0.0
        if length <= 0 or step >= start + length:
            return 1.0
        t = (step - start) / length
        return t if self.shape == "linear" else 0.5 - 0.5 * math.cos(math.pi * t)
