"""``make demo``: train a branched DeiT-Tiny with progressive joining, fuse it, and compare it with a deep
one.

Runs on a 2-core CPU in a few minutes with no downloads: the data are generated
(fxrep.training.synthetic_shapes). Writes ``runs/demo/training.png`` (join schedule and loss) and prints a
table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import timm
import torch

import fxrep
import fxrep.models  # noqa: F401
from fxrep.benchmarking import markdown_table, measure_latency
from fxrep.equivalence import relative_error
from fxrep.training import TrainConfig, synthetic_shapes, train

IMAGE = dict(img_size=32, patch_size=8, in_chans=1, num_classes=4)


def plot(history, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plot)")
        return None
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(steps, [h["loss"] for h in history], color="tab:blue", label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(steps, [h["lam"] for h in history], color="tab:orange", label="join lam")
    ax2.set_ylabel("join coefficient lam", color="tab:orange")
    ax2.set_ylim(-0.05, 1.05)
    ax.set_title("fxrep_deit_tiny_d3b4: progressive joining")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="fxrep demo: train -> join -> fuse -> compare")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--out", default="runs/demo")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    torch.manual_seed(0)
    t0 = time.time()
    train_set = synthetic_shapes(4096, IMAGE["img_size"], 1, IMAGE["num_classes"], seed=0)
    eval_set = synthetic_shapes(512, IMAGE["img_size"], 1, IMAGE["num_classes"], seed=1)

    print("1. train fxrep_deit_tiny_d3b4 (3 blocks x 4 branches) with progressive joining, lam 0 -> 1")
    model = timm.create_model("fxrep_deit_tiny_d3b4", init_values=0.1, **IMAGE)
    result = train(model, train_set, eval_set, TrainConfig(steps=args.steps, batch_size=64, lr=1e-3,
                                                           out_dir=args.out, fuse_at_end=False))
    model.eval()

    print("\n2. fuse (check=True compares fused and unfused outputs)")
    x1 = train_set[0][0].unsqueeze(0)
    fused = fxrep.fuse(model, example_inputs=(x1,), check=True)
    every_row = fxrep.fuse(model, example_inputs=(x1,), prune_rows=False)  # the last block on every token
    report = fused.meta["fxrep_report"]
    print(f"   applied: {report.patterns_applied()}")
    deep = timm.create_model("vit_tiny_patch16_224", depth=12, **IMAGE).eval()

    batch = torch.stack([eval_set[i][0] for i in range(64)])
    with torch.no_grad():
        diff = relative_error(model(batch), fused(batch))
        agree = (model(batch).argmax(-1) == fused(batch).argmax(-1)).float().mean().item()
    lat = measure_latency({"deep": deep, "branched": model, "fused": fused, "fused, every row": every_row},
                          (x1,), repeats=40)
    base = lat["deep"]["median"]

    def row(name, m, layers):
        t = lat[name]
        return (name, layers, f"{fxrep.count_params(m) / 1e6:.2f} M",
                f"{fxrep.count_flops(m, (x1,)) / 1e6:.1f} M",
                f"{t['median'] * 1e3:.2f} ({t['min'] * 1e3:.2f}-{t['max'] * 1e3:.2f})",
                f"{t['median'] / base:.2f}x")

    print("\n3. deep DeiT-Tiny vs the trained branched model before and after fuse "
          f"(CPU, batch 1, {IMAGE['img_size']}px, {torch.get_num_threads()} threads, median of 40 "
          f"interleaved runs)")
    print(markdown_table(["model", "layers", "params", "FLOPs", "latency ms (min-max)", "vs deep"], [
        row("deep", deep, 12), row("branched", model, "3 x 4 branches"), row("fused", fused, 3),
        row("fused, every row", every_row, 3)]))
    print("   fused computes only the rows the classifier reads (the class token in the last block); "
          "prune_rows=False computes every row")
    print(f"\n   eval accuracy {100 * result.eval_accuracy:.1f}% on generated shapes; fused vs unfused on 64 "
          f"images: max|delta|/max|y| = {diff:.2e}, same prediction on {100 * agree:.0f}%")
    png = plot(result.history, Path(args.out) / "training.png")
    if png:
        print(f"   plot of the join schedule and the loss: {png}")
    print(f"   done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
