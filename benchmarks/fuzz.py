"""Differential fuzzing of ``fxrep.fuse`` on random, mostly non-conforming graphs
(fxrep.testing.random_graphs).

    python benchmarks/fuzz.py [--examples 2000] [--seed 0]

Property: fuse raises a documented FxrepError or returns a model whose outputs match the original's
(float32 1e-5, float64 1e-10, bfloat16 5e-2 relative to max |y|), and the input model is unchanged.
Prints examples tried, rewrites applied, documented errors and failures; a failure is shrunk by hypothesis
and printed (add it to tests/test_fuzz.py as a regression test).
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from hypothesis import HealthCheck, given, seed, settings

from fxrep.testing import fuzz_check, random_graphs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=12)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    stats = collections.Counter()
    errors = collections.Counter()
    start = time.time()

    @seed(args.seed)
    @settings(max_examples=args.examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(random_graphs(max_steps=args.max_steps))
    def run(case):
        result = fuzz_check(case)
        stats["tried"] += 1
        stats["rewrites"] += result["applied"]
        stats["fused"] += result["applied"] > 0
        if result["error"]:
            errors[result["error"].split(":")[0]] += 1
        if stats["tried"] % 250 == 0:
            print(f"  {stats['tried']} examples, {time.time() - start:.0f} s", flush=True)

    failure = None
    try:
        run()
    except Exception as e:  # noqa: BLE001 - report the shrunk failure
        failure = e
    print(f"examples tried:          {stats['tried']}")
    print(f"models with rewrites:    {stats['fused']}")
    print(f"rewrites applied:        {stats['rewrites']}")
    print(f"documented errors:       {dict(errors) or 0}")
    print(f"failures:                {1 if failure else 0}")
    print(f"time:                    {time.time() - start:.0f} s")
    if failure:
        print(f"\nFAILURE: {type(failure).__name__}: {failure}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
