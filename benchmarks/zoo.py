"""Reliability on models written by others: fuse every timm model module and torchvision classifier.

    python benchmarks/zoo.py [--source timm torchvision huggingface] [--flows module traced exported]
                             [--max-params 60e6] [--only swin,levit] [--csv runs/zoo.csv]
    python benchmarks/zoo.py --hf          # Hugging Face vision models through fxrep.fuse(model) alone

One model per timm module (the smallest by name, sized on the meta device) and every torchvision
classification model, under the parameter cap, random weights, batch 1, default input size; with ``--source
huggingface`` (or ``--hf``) every Hugging Face image classification model type, built from its default config
with small sizes (``zoo_harness.huggingface_zoo``). Each is fused as a new user would, in three flows
(``fxrep.fuse(model)``, ``fxrep.fuse(torch.fx.symbolic_trace(model))`` where plain fx traces it, and
``fxrep.fuse(torch.export.export(model, (x,)))`` where export captures it), run, compared with the original,
and the original is checked for changes (zoo_harness.try_fuse). Prints a table of outcomes per source and
flow, every bad row, and the run time; writes one CSV row per (model, flow). Target: 0 broken, 0 wrong, 0
mutated, 0 fixed_point, 0 raw.
"""

from __future__ import annotations

import argparse
import collections
import csv
import gc
import os
import sys
import time

import torch
from tqdm import tqdm
from zoo_harness import BAD_OUTCOMES, ZooResult, build, huggingface_zoo, timm_zoo, torchvision_zoo, try_fuse

COLUMNS = ("exact", "error", "untraceable", "broken", "wrong", "mutated", "fixed_point", "internal", "raw",
           "no_run")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", nargs="+", default=["timm", "torchvision"],
                    choices=["timm", "torchvision", "huggingface"])
    ap.add_argument("--hf", action="store_true", help="Hugging Face models only, module flow only")
    ap.add_argument("--flows", nargs="+", default=["module", "traced", "exported"],
                    choices=["module", "traced", "exported"])
    ap.add_argument("--max-params", type=float, default=60e6)
    ap.add_argument("--only", default="", help="comma-separated substrings of model or module names")
    ap.add_argument("--csv", default="runs/zoo.csv")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.hf:
        args.source, args.flows = ["huggingface"], ["module"]
    torch.set_num_threads(args.threads)
    start = time.time()

    models = []
    if "timm" in args.source:
        models += [("timm", *t) for t in timm_zoo(args.max_params)]
    if "torchvision" in args.source:
        models += [("torchvision", *t) for t in torchvision_zoo(args.max_params)]
    if "huggingface" in args.source:
        models += [("huggingface", *t) for t in huggingface_zoo()]
    if args.only:
        keys = args.only.split(",")
        models = [m for m in models if any(k in m[1] or k in m[2] for k in keys)]
    print(f"{len(models)} models, flows {args.flows} (listing took {time.time() - start:.0f} s)", flush=True)

    results: list[ZooResult] = []
    for source, _family, name, _ in tqdm(models, desc="zoo", unit="model", file=sys.stdout):
        try:
            model, x = build(source, name)
            for flow in args.flows:
                r = try_fuse(model, x, flow)
                r.source, r.model = source, name
                results.append(r)
        except Exception as e:  # noqa: BLE001 - the model itself does not build or run: not fxrep's business
            results.append(ZooResult(source, name, "-", "no_run", f"{type(e).__name__}: {str(e)[:150]}"))
        finally:
            model = x = None
            gc.collect()

    _table(results)
    bad = [r for r in results if r.outcome in BAD_OUTCOMES]
    for r in bad:
        print(f"  BAD {r.source:11s} {r.model:40s} {r.flow:7s} {r.outcome:11s} {r.detail}")
    os.makedirs(os.path.dirname(args.csv) or ".", exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(ZooResult("", "", "", "").row()))
        w.writeheader()
        w.writerows(r.row() for r in results)
    print(f"\nrows in {args.csv}; total time {time.time() - start:.0f} s")
    return 1 if bad else 0


def _table(results: list[ZooResult]) -> None:
    counts = collections.Counter((r.source, r.flow, r.outcome) for r in results)
    errors = collections.Counter((r.source, r.flow, r.detail.split(":")[0])
                                 for r in results if r.outcome == "error")
    print("\n| source | flow | " + " | ".join(COLUMNS) + " | fuse s (median) |")
    print("|---|---|" + "---|" * (len(COLUMNS) + 1))
    for source in sorted({r.source for r in results}):
        for flow in ("module", "traced", "exported", "-"):
            rows = [r for r in results if r.source == source and r.flow == flow]
            if not rows:
                continue
            times = sorted(r.seconds for r in rows if r.seconds)
            median = f"{times[len(times) // 2]:.2f}" if times else "-"
            print(f"| {source} | {flow} | " + " | ".join(str(counts[(source, flow, c)]) for c in COLUMNS)
                  + f" | {median} |")
    if errors:
        print("\nclear FxrepErrors by class: " + ", ".join(f"{s}/{fl} {c}: {n}"
                                                           for (s, fl, c), n in sorted(errors.items())))


if __name__ == "__main__":
    raise SystemExit(main())
