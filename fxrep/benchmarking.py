"""Side-by-side timing: models run interleaved in one process, warm-up excluded, medians and min-max."""

from __future__ import annotations

import statistics
import time

import torch


def measure_latency(models: dict, inputs: tuple, repeats: int = 30, warmup: int = 5,
                    inner: int = 1) -> dict[str, dict]:
    """Per model: median, min and max seconds of one forward pass on ``inputs``, with the models run in
    round-robin order (model A, B, C, A, B, C, ...) so drift in machine load hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(warmup):
            for m in models.values():
                m(*inputs)
        for _ in range(repeats):
            for name, m in models.items():
                start = time.perf_counter()
                for _ in range(inner):
                    m(*inputs)
                times[name].append((time.perf_counter() - start) / inner)
    return {name: {"median": statistics.median(t), "min": min(t), "max": max(t)} for name, t in times.items()}


def markdown_table(headers, rows) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)
