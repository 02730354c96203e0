"""Time of ``fxrep.fuse`` against depth and branch count, and its growth with graph size.

    python benchmarks/fuse_time.py [--quick]

Rows: branched ViTs (fxrep BranchedBlock, lam = 1) at DeiT-Tiny width (192, 3 heads) and ViT-Base width
(768, 12 heads), with targets: d3b4 DeiT-Tiny under 1 s, 12 blocks x 4 branches ViT-Base under 5 s, and a
12-block branched MLP model under 1 s. Prints the exponent of time ~ nodes^k fitted over all rows.
Then the torch.export front end: the registered ``fxrep_deit_tiny_d3b4`` (224 px, joined) exported with a
dynamic batch, export time and ``fxrep.fuse(program)`` time apart (target: fuse < 1.5 s).
Last, row pruning on the fused graphs of 12, 24 and 48 blocks (interleaved, medians): exported
(``fxrep.export.rows.move_row_selections_up``, run from the outputs up by ``engine.run_upward``, against the
same moves run by the engine's sweeps), and as ``fxrep.fuse`` returns it (``fxrep.row_pruning``).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time

import timm
import torch
import torch.nn as nn

import fxrep
from fxrep import row_pruning as torch_row_pruning
from fxrep.benchmarking import markdown_table
from fxrep.engine import run_pass
from fxrep.export import rows as row_pruning
from fxrep.models import set_join
from fxrep.models.registry import _create
from fxrep.testing import GeneratedMlpBlock, MlpSpec


def branched_vit(width: int, heads: int, depth: int, branches: int):
    model = _create("fxrep_deit_tiny_d12b1", branches=branches, depth=depth, embed_dim=width, num_heads=heads,
                    num_classes=10, img_size=32, patch_size=8, init_values=0.1).eval()
    set_join(model, 1.0)
    return model


def mlp_stack(depth: int, branches: int):
    return nn.Sequential(*[GeneratedMlpBlock(MlpSpec(dim=192, hidden=768, branches=branches, lam=1.0, seed=i))
                           for i in range(depth)]).eval()


def time_fuse(model, repeats: int) -> tuple[float, int]:
    gm = fxrep.trace(model)
    nodes = len(gm.graph.nodes)
    fxrep.fuse(model)  # warm-up: first-call imports and allocator growth are not fuse time
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fxrep.fuse(model)
        times.append(time.perf_counter() - start)
    return statistics.median(times), nodes


def time_export_fuse(repeats: int) -> tuple[float, float]:
    """(export seconds, fxrep.fuse(program) seconds), medians, for the registered d3b4 with a dynamic
    batch."""
    model = timm.create_model("fxrep_deit_tiny_d3b4").eval()
    set_join(model, 1.0)
    x = (torch.randn(2, 3, 224, 224),)
    batch = torch.export.Dim("batch", min=1)
    exports, fuses = [], []
    for _ in range(repeats + 1):  # the first of each is a warm-up
        start = time.perf_counter()
        ep = torch.export.export(model, x, dynamic_shapes=({0: batch},))
        exports.append(time.perf_counter() - start)
        start = time.perf_counter()
        fxrep.fuse(ep)
        fuses.append(time.perf_counter() - start)
    return statistics.median(exports[1:]), statistics.median(fuses[1:])


def _sweeping_reference(graph) -> bool:
    """The same row moves run by the engine's sweeps (``engine.run_pass``): every sweep collects its matches
    first, so a selection moves one op per sweep over the whole graph."""
    return bool(run_pass(graph.owning_module, (row_pruning.MoveRowSelectionUp(),), "rows").applied)


def time_row_pruning(depth: int, repeats: int) -> tuple[int, float, float, float]:
    """(graph nodes, upward seconds, sweeping seconds, torch-level seconds), medians over interleaved runs on
    fresh copies of the fused graph of a depth x 4 branched ViT: exported (``fxrep.export.rows``, run from
    the outputs up or by sweeps), and as ``fxrep.fuse`` returns it (``fxrep.row_pruning``, shape propagation
    included)."""
    model = branched_vit(192, 3, depth, 4)
    x = torch.randn(1, 3, 32, 32)
    fused = fxrep.fuse(model, example_inputs=(x,), prune_rows=False)
    program = torch.export.export(fused, (x,))
    times: dict = {"upward": [], "sweeping": [], "torch": []}
    nodes = 0
    for _ in range(repeats):
        for name, run in (("upward", row_pruning.move_row_selections_up), ("sweeping", _sweeping_reference)):
            graph = program.module().graph
            nodes = len(graph.nodes)
            start = time.perf_counter()
            assert run(graph)
            times[name].append(time.perf_counter() - start)
        gm = copy.deepcopy(fused)
        start = time.perf_counter()
        assert torch_row_pruning.move_row_selections_up(gm, (x,))
        times["torch"].append(time.perf_counter() - start)
    return nodes, *(statistics.median(times[k]) for k in ("upward", "sweeping", "torch"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rows, one repeat")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    cases = [("MLP model (target < 1 s)", "mlp", 192, 0, 12, 4)]
    depths = [3, 12] if args.quick else [3, 6, 12, 24, 48]
    for d in depths:
        cases.append((f"DeiT-Tiny width{' (target < 1 s)' if d == 3 else ''}", "vit", 192, 3, d, 4))
    for b in ([1, 8] if args.quick else [1, 2, 8]):
        cases.append(("DeiT-Tiny width", "vit", 192, 3, 12, b))
    if not args.quick:
        cases.append(("ViT-Base width", "vit", 768, 12, 3, 4))
    cases.append(("ViT-Base width (target < 5 s)", "vit", 768, 12, 12, 4))
    rows, points = [], []
    for label, kind, width, heads, depth, branches in cases:
        model = mlp_stack(depth, branches) if kind == "mlp" else branched_vit(width, heads, depth, branches)
        seconds, nodes = time_fuse(model, 1 if args.quick else 3)
        rows.append((label, width, depth, branches, nodes, f"{seconds:.3f}"))
        points.append((nodes, seconds))
        print(f"{label}: depth {depth} x {branches} branches, {nodes} nodes: {seconds:.3f} s", flush=True)
    xs = [math.log(n) for n, _ in points]
    ys = [math.log(s) for _, s in points]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    k = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    print()
    print(markdown_table(["model", "width", "blocks", "branches", "graph nodes", "fuse time (s, median)"],
                         rows))
    print(f"\nfitted growth: time ~ nodes^{k:.2f}")
    export_s, fuse_s = time_export_fuse(1 if args.quick else 3)
    print()
    print(markdown_table(["torch.export front end", "export (s, median)", "fxrep.fuse(program) (s, median)"],
                         [("fxrep_deit_tiny_d3b4, dynamic batch (target fuse < 1.5 s)", f"{export_s:.3f}",
                           f"{fuse_s:.3f}")]))
    prune_rows = []
    for depth in ([12, 24] if args.quick else [12, 24, 48]):
        nodes, upward, sweeping, torch_level = time_row_pruning(depth, 1 if args.quick else 3)
        prune_rows.append((f"{depth} x 4", nodes, f"{upward * 1e3:.1f}", f"{sweeping * 1e3:.1f}",
                           f"{torch_level * 1e3:.1f}"))
    print()
    print(markdown_table(["row pruning, fused graph", "exported graph nodes", "exported: upward (ms)",
                          "exported: engine sweeps (ms)", "as fuse returns it, shapes included (ms)"],
                         prune_rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
