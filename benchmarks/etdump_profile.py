"""Where an ExecuTorch program's time goes: XNNPACK's per-op events from ExecuTorch's ETDump, summed by kind.

    python benchmarks/etdump_profile.py [--model fxrep_deit_tiny_d3b4] [--runs 30] [--threads 2]

Lowers the fused model (lam = 1, rank-aware, 224 px, batch 1, random weights) three ways: fp32 with every row
computed (``prune_rows=False``), fp32 as ``to_executorch`` writes it by default, and int8 (calibrated on
random images, which sets the scales, not the speed). Runs each ``--runs`` times with ETDump on and prints,
for the last run, the delegate call and the medians of XNNPACK's events by kind
(``executorch.devtools.Inspector``).
"""

from __future__ import annotations

import argparse
import collections
import tempfile

import torch

from fxrep.benchmarking import markdown_table

KINDS = (("Fully Connected", "fully connected"), ("Batch Matrix Multiply", "batch matmul"),
         ("Convolution", "patch convolution"), ("Softmax", "softmax"), ("Convert", "int8 convert"))


def profile(path: str, x: torch.Tensor, runs: int) -> dict:
    from executorch.devtools import Inspector
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    program = _load_for_executorch(path, enable_etdump=True)
    for _ in range(runs):
        program.forward([x])
    dump = path + ".etdp"
    program.write_etdump_result_to_file(dump)
    block = [b for b in Inspector(etdump_path=dump).event_blocks if b.name == "Execute"][-1]
    times, samples = collections.Counter(), 0
    for event in block.events:
        if event.perf_data is None:
            continue
        samples = max(samples, len(event.perf_data.raw))
        if event.name == "DELEGATE_CALL":
            times["delegate call"] += event.perf_data.p50
        elif event.is_delegated_op:
            kind = next((label for prefix, label in KINDS if event.name.startswith(prefix)), "other")
            times[kind] += event.perf_data.p50
    times["samples"] = samples
    return times


def main() -> None:
    import sys
    from pathlib import Path

    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    sys.path.insert(0, str(Path(__file__).parent))
    from latency import fused

    from fxrep.export import to_executorch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fxrep_deit_tiny_d3b4")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    _unsafe_reset_threadpool(args.threads)
    torch.set_num_threads(args.threads)
    x = torch.randn(1, 3, 224, 224)
    model = fused(args.model, 1.0, x, True)
    calibration = [(torch.randn(1, 3, 224, 224),) for _ in range(8)]
    out = Path(tempfile.mkdtemp(prefix="fxrep_etdump_"))
    variants = {"fp32, all rows": {"prune_rows": False}, "fp32": {},
                "int8": {"quantize": "int8", "calibration": calibration}}
    columns = ["delegate call", *(label for _, label in KINDS), "other"]
    rows = []
    for name, options in variants.items():
        path = to_executorch(model, (x,), out / f"{len(rows)}.pte", **options)
        times = profile(str(path), x, args.runs)
        rows.append((name, *(f"{times[c]:.2f}" if c in times else "-" for c in columns)))
        print(f"  profiled {name} ({times['samples']} samples per event)", flush=True)
    print(f"{args.model}, ExecuTorch ETDump, {args.threads} threads, median of {args.runs} runs, ms")
    print(markdown_table(["program", *columns], rows))


if __name__ == "__main__":
    main()
