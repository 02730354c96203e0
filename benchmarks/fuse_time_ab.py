"""Fuse time of two checkouts of fxrep, interleaved: is a change slower?

    git worktree add /tmp/before <commit>            # the tree to compare against
    python benchmarks/fuse_time_ab.py /tmp/before [--rounds 6]

Each round runs one fresh process per checkout, alternating which goes first; a process imports fxrep from
its checkout, fuses each case once to warm up, then times it (median of 5, 3 for the slower cases) on one
thread. Prints the median over rounds per case and the ratio after/before. Cases: the registered
``fxrep_deit_tiny_d3b4`` at 224 px with and without example inputs (with them, widening is priced and rows
are pruned), the same model as an ExportedProgram, and a 12 x 4 branched ViT at DeiT-Tiny width.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]

# run in a fresh process with the checkout's fxrep first on the path; prints one JSON line of medians
CASES = r"""
import json, statistics, time
import timm, torch
import fxrep, fxrep.models
from fxrep.models import set_join
from fxrep.models.registry import _create

torch.set_num_threads(1)

def median_time(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)

x224, x32 = torch.randn(1, 3, 224, 224), torch.randn(1, 3, 32, 32)
d3b4 = timm.create_model("fxrep_deit_tiny_d3b4").eval()
set_join(d3b4, 1.0)
program = torch.export.export(d3b4, (x224,))
deep = _create("fxrep_deit_tiny_d12b1", branches=4, depth=12, embed_dim=192, num_heads=3, num_classes=10,
               img_size=32, patch_size=8, init_values=0.1).eval()
set_join(deep, 1.0)
print(json.dumps({
    "d3b4, 224 px, example_inputs": median_time(lambda: fxrep.fuse(d3b4, example_inputs=(x224,)), 5),
    "d3b4, no example_inputs": median_time(lambda: fxrep.fuse(d3b4), 5),
    "d3b4 as an ExportedProgram": median_time(lambda: fxrep.fuse(program, example_inputs=(x224,)), 3),
    "12 x 4 blocks, DeiT-Tiny width, example_inputs": median_time(
        lambda: fxrep.fuse(deep, example_inputs=(x32,)), 3),
}))
"""


def run(checkout: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    done = subprocess.run([sys.executable, "-c", CASES], cwd=checkout, env=env, capture_output=True,
                          text=True)
    if done.returncode:
        raise SystemExit(f"{checkout}: the timing process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path, help="a checkout of fxrep to compare this one against")
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args(argv)
    if not (args.before / "fxrep" / "__init__.py").is_file():
        raise SystemExit(f"{args.before} is not a checkout of fxrep (no fxrep/__init__.py): create one with "
                         "git worktree add <dir> <commit>")
    trees = {"before": args.before.resolve(), "after": HERE}
    results: dict = {name: [] for name in trees}
    for r in range(args.rounds):
        order = list(trees) if r % 2 == 0 else list(trees)[::-1]
        for name in order:
            results[name].append(run(trees[name]))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    print(f"\nbefore: {trees['before']}\nafter:  {trees['after']}\n")
    print("| case | before (s) | after (s) | after / before |\n|---|---|---|---|")
    for case in results["after"][0]:
        before = statistics.median(r[case] for r in results["before"])
        after = statistics.median(r[case] for r in results["after"])
        print(f"| {case} | {before:.3f} | {after:.3f} | {after / before:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
