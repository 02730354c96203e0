"""``fxrep.export.prune_unread_rows`` on models written by others: every timm model module (its smallest
model) and every torchvision classifier under 60 M parameters, exported at batch 1 with random weights.

    python benchmarks/rows_zoo.py [--limit N] [--json FILE]

Outcomes: ``pruned`` (some rows are no longer computed; outputs agree on a fresh input within 1e-5),
``untouched`` (nothing to prune: the program is returned as it is), ``export failed`` (torch.export, not
fxrep), and the bad ones: ``wrong`` (outputs differ), ``internal`` (fxrep's own check caught a broken
program), ``raw`` (anything else raised).
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import torch
from tqdm import tqdm
from zoo_harness import build, timm_zoo, torchvision_zoo

from fxrep.equivalence import relative_error
from fxrep.errors import InternalError
from fxrep.export.rows import prune_unread_rows

TOLERANCE = 1e-5


def one(source: str, name: str) -> dict:
    record = {"source": source, "model": name}
    start = time.perf_counter()
    try:
        model, x = build(source, name)
        with torch.no_grad():
            program = torch.export.export(model, (x,))
    except Exception as e:  # noqa: BLE001 - models torch.export cannot take are not fxrep's to prune
        return record | {"outcome": "export failed", "detail": type(e).__name__}
    try:
        pruned = prune_unread_rows(program, (x,))
        if pruned is program:
            record["outcome"] = "untouched"
        else:
            fresh = torch.randn_like(x)
            with torch.no_grad():
                error = float(relative_error(model(fresh), pruned.module()(fresh)))
            record |= {"outcome": "pruned" if error < TOLERANCE else "wrong", "error": error}
    except InternalError as e:
        record |= {"outcome": "internal", "detail": str(e)[:300]}
    except Exception as e:  # noqa: BLE001 - the report names it
        record |= {"outcome": "raw", "detail": f"{type(e).__name__}: {str(e)[:300]}"}
    return record | {"seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="only the first N models")
    ap.add_argument("--json", default=None, help="write every record to this file")
    args = ap.parse_args()
    torch.set_num_threads(2)
    models = [("timm", n) for _, n, _ in timm_zoo()] + [("torchvision", n) for _, n, _ in torchvision_zoo()]
    records = [one(source, name) for source, name in tqdm(models[:args.limit], desc="models", unit="model")]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    print(dict(collections.Counter(r["outcome"] for r in records)))
    for r in records:
        if r["outcome"] != "untouched":
            print(f"  {r['source']} {r['model']}: {r['outcome']} {r.get('error', r.get('detail', ''))}")


if __name__ == "__main__":
    main()
