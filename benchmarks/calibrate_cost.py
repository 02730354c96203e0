"""Measure the kernel-time table that fxrep's default cost model prices widen groups with.

    python benchmarks/calibrate_cost.py [--out fxrep/cost/cpu_x86_64.json] [--threads 2] [--repeats 15]

Times ``F.linear`` on a grid of (rows, in, out), ``F.scaled_dot_product_attention`` on (batch x heads,
tokens, head width), GELU and an add by element count: the median of ``--repeats`` runs after warm-up, each
run long enough (a kernel repeated) to read past the timer's resolution. Grid points whose work exceeds a
budget are left out; the table extrapolates there by work. The table is written with the machine, thread
count, torch version and date it was measured on; fuse decisions then follow from it alone, so rerun this
script and commit the file only to recalibrate on purpose (it changes which groups widen).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

ROWS = [1, 4, 16, 64, 256, 1024, 4096]
FEATURES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
BATCH_HEADS = [1, 2, 4, 8, 16, 32, 64, 128]
TOKENS = [16, 64, 256, 1024]
HEAD_WIDTHS = [16, 32, 64, 128]
ELEMENTS = [2 ** k for k in range(8, 25, 2)]
MAX_MACS = 2 ** 31  # leave out grid points with more work than this (they take too long to measure)


def _median_ms(fn, repeats: int, min_run_s: float = 1e-3) -> float:
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    inner = max(1, int(min_run_s / once))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - start) / inner * 1e3)
    return float(f"{statistics.median(samples):.4g}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(repeats: int) -> dict:
    table: dict = {"linear": [], "attention": [], "activation": [], "add": []}
    linear = [p for p in itertools.product(ROWS, FEATURES, FEATURES) if p[0] * p[1] * p[2] <= MAX_MACS]
    attention = [p for p in itertools.product(BATCH_HEADS, TOKENS, HEAD_WIDTHS)
                 if p[0] * p[1] ** 2 * p[2] <= MAX_MACS]
    with torch.inference_mode():
        for m, k, n in tqdm(linear, desc="linear"):
            x, w = torch.randn(m, k), torch.randn(n, k) / k ** 0.5
            table["linear"].append([m, k, n, _median_ms(lambda x=x, w=w: F.linear(x, w), repeats)])
        for bh, t, dh in tqdm(attention, desc="attention"):
            q, k, v = (torch.randn(bh, t, dh) for _ in range(3))
            table["attention"].append([bh, t, dh, _median_ms(
                lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, scale=1.0), repeats)])
        for e in tqdm(ELEMENTS, desc="elementwise"):
            a, b = torch.randn(e), torch.randn(e)
            table["activation"].append([e, _median_ms(lambda a=a: F.gelu(a), repeats)])
            table["add"].append([e, _median_ms(lambda a=a, b=b: a + b, repeats)])
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out",
                    default=str(Path(__file__).resolve().parents[1] / "fxrep" / "cost" / "cpu_x86_64.json"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=31)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    table = measure(args.repeats)
    table["meta"] = {
        "source": "benchmarks/calibrate_cost.py", "machine": _cpu_name(), "arch": platform.machine(),
        "threads": args.threads, "torch": torch.__version__.split("+")[0],
        "capability": torch.backends.cpu.get_cpu_capability(), "dtype": "float32",
        "date": datetime.date.today().isoformat(), "repeats": args.repeats,
    }
    rows = [r for kind in ("linear", "attention", "activation", "add") for r in table[kind]]
    text = "{\n" + f'"meta": {json.dumps(table["meta"])},\n' + ",\n".join(
        f'"{kind}": [\n' + ",\n".join(json.dumps(r) for r in table[kind]) + "\n]"
        for kind in ("linear", "attention", "activation", "add")) + "\n}\n"
    Path(args.out).write_text(text)
    print(f"{len(rows)} kernel times in {time.time() - start:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
