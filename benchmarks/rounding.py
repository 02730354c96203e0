"""How far fused outputs are from unfused ones, per CPU kernel set: the evidence behind
``numerics.MODEL_RTOL``.

    python benchmarks/rounding.py [--kernels default avx2 avx512] [--seeds 3]

For each model (random weights, several seeds and inputs) and each kernel set (``ATEN_CPU_CAPABILITY``, one
subprocess each), fuse and report the largest ``max |y - y_fused| / max |y|`` over the seeds, and that error
in units of the dtype's roundoff, against the tolerance the tests use. A kernel set the CPU lacks falls back
to the best it has (torch prints which); the table says what ran.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

MODELS = {  # name: (timm name or builder, kwargs, input shape)
    "fxrep d3b4, joined": ("fxrep_deit_tiny_d3b4", {"num_classes": 10}, (2, 3, 224, 224), 1.0),
    "fxrep d4b3, joined": ("fxrep_deit_tiny_d4b3", {"num_classes": 10}, (2, 3, 224, 224), 1.0),
    "fxrep d6b2, joined": ("fxrep_deit_tiny_d6b2", {"num_classes": 10}, (2, 3, 224, 224), 1.0),
    "fxrep d3b4, lam 0.5": ("fxrep_deit_tiny_d3b4", {"num_classes": 10}, (2, 3, 224, 224), 0.5),
    "timm vit_small_patch16_18x2_224": ("vit_small_patch16_18x2_224", {"depth": 6}, (2, 3, 224, 224), None),
    "timm deit_tiny_patch16_224": ("deit_tiny_patch16_224", {}, (2, 3, 224, 224), None),
}

_CHILD = """
import json, sys, torch, timm
import fxrep, fxrep.models
from fxrep.equivalence import relative_error
name, kwargs, shape, lam, seeds, dtype = json.loads(sys.argv[1])
dtype = getattr(torch, dtype)
worst = 0.0
for seed in range(seeds):
    torch.manual_seed(seed)
    model = timm.create_model(name, **kwargs).eval().to(dtype)
    if lam is not None:
        model.set_join(lam)
    x = torch.randn(*shape).to(dtype)
    fused = fxrep.fuse(model, example_inputs=(x,))
    with torch.no_grad():
        worst = max(worst, relative_error(model(x), fused(x)))
print(json.dumps({"error": worst, "capability": torch.backends.cpu.get_cpu_capability()}))
"""


def run(kernels: str, spec, seeds: int, dtype: str) -> dict:
    """The child's result, or {"failed": the last line of its error} (torch's bfloat16 SDPA raises 'pack_vnni2
    is only supported when avx512 is supported' when an AVX-512 machine is forced to the default kernels)."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY=kernels)
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps([*spec, seeds, dtype])], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        return {"failed": (out.stderr.strip().splitlines() or ["?"])[-1][-120:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", nargs="+", default=["default", "avx2", "avx512"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = ap.parse_args(argv)
    import torch

    from fxrep.benchmarking import markdown_table
    from fxrep.numerics import MODEL_RTOL, unit_roundoff

    rows = []
    for dtype in args.dtypes:
        t = getattr(torch, dtype)
        for label, spec in MODELS.items():
            cells = []
            for kernels in args.kernels:
                r = run(kernels, spec, args.seeds, dtype)
                cells.append(f"failed: {r['failed']}" if "failed" in r else
                             f"{r['error']:.2e} ({r['error'] / unit_roundoff(t):.1f} u, {r['capability']})")
            rows.append((label, dtype, *cells,
                         f"{MODEL_RTOL[t]:g} ({MODEL_RTOL[t] / unit_roundoff(t):.0f} u)"))
            print(rows[-1], flush=True)
    print(markdown_table(["model", "dtype", *[f"kernels={k}" for k in args.kernels], "MODEL_RTOL"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
