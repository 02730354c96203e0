"""Accuracy on real data: the MNIST t10k set with the repository's fixed split (8,000 train / 2,000 eval).

    python benchmarks/accuracy_mnist.py [--width 96] [--heads 3] [--steps 3500] [--seeds 0 1 2]
                                        [--workers 2] [--int8] [--convergence-check] [--plot FILE]
                                        [--out runs/accuracy] [--data DIR]

Rows, each trained from scratch with every seed (AdamW, cosine learning rate, batch 64, 28 px, patch 7):
- ``deep-12``: a plain 12-layer ViT (the baseline);
- ``d6b2``, ``d4b3``, ``d3b4``: branched models, trained with progressive joining (lam 0 -> 1) and fused;
- ``plain-3``: a plain 3-layer ViT for the same number of steps (equal steps), and ``plain-3 x4`` for four
  times as many (equal training FLOPs: a 3 x 4 branched model costs per step what the 12-layer one costs).
With ``--convergence-check``, deep-12 also trains for 1.5 times the steps (first seed): if it is no better,
the budget is one at which the baseline has stopped improving.

The table gives eval accuracy as mean +- standard deviation over seeds before and after fuse, the
predictions fuse changed over all seeds (expected 0), parameters, and training FLOPs (3 x the forward FLOPs of
one image, times images seen). ``--int8`` adds int8 ExecuTorch programs (``to_executorch(quantize="int8")``,
calibrated on 200 training images) of deep-12 and of the best branched row, over the same seeds. The
learning curves (eval accuracy every ``--eval-every`` steps, mean and range over seeds) go to ``--plot``.
Jobs run in ``--workers`` processes of one thread each (on this 2-core machine two one-thread runs finish
sooner than two two-thread runs in turn).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

ROWS = {  # id: (label, timm name, extra kwargs, steps multiplier)
    "deep-12": ("deep 12-layer (baseline)", "vit_tiny_patch16_224", {"depth": 12}, 1.0),
    "plain-3": ("plain 3-layer, equal steps", "vit_tiny_patch16_224", {"depth": 3}, 1.0),
    "plain-3 x4": ("plain 3-layer, equal FLOPs (4x steps)", "vit_tiny_patch16_224", {"depth": 3}, 4.0),
    "d6b2": ("branched d6b2, joined + fused", "fxrep_deit_tiny_d6b2", {}, 1.0),
    "d4b3": ("branched d4b3, joined + fused", "fxrep_deit_tiny_d4b3", {}, 1.0),
    "d3b4": ("branched d3b4, joined + fused", "fxrep_deit_tiny_d3b4", {}, 1.0),
}
CHECK = "deep-12 x1.5"
BRANCHED = ("d6b2", "d4b3", "d3b4")


def _model(row: str, width: int, heads: int):
    import timm

    import fxrep.models  # noqa: F401  (registers the branched models)

    _, name, extra, _ = ROWS["deep-12" if row == CHECK else row]
    return timm.create_model(name, num_classes=10, img_size=28, patch_size=7, in_chans=1, embed_dim=width,
                             num_heads=heads, **extra)


def train_job(row: str, seed: int, args: dict) -> dict:
    """Train one row with one seed (in a worker process, one thread); fuse; return its record."""
    import torch

    import fxrep
    from fxrep.training import TrainConfig, load_mnist_idx, train

    torch.set_num_threads(1)
    train_set, eval_set = load_mnist_idx(args["data"], "train"), load_mnist_idx(args["data"], "eval")
    torch.manual_seed(seed)
    model = _model(row, args["width"], args["heads"])
    multiplier = 1.5 if row == CHECK else ROWS[row][3]
    steps = int(args["steps"] * multiplier)
    out = Path(args["out"]) / f"{row.replace(' ', '_')}-seed{seed}"
    start = time.time()
    cfg = TrainConfig(steps=steps, batch_size=args["batch_size"], lr=args["lr"], seed=seed, out_dir=str(out),
                      eval_every=args["eval_every"], progress=False)
    result = train(model, train_set, eval_set, cfg)
    x1 = train_set[0][0].unsqueeze(0)
    model.eval()
    forward_flops = fxrep.count_flops(model, (x1,))
    return {"row": row, "seed": seed, "steps": steps, "train_s": round(time.time() - start),
            "acc_before": result.eval_accuracy, "acc_after": result.fused_accuracy,
            "changed": result.prediction_mismatches, "params": fxrep.count_params(result.fused),
            "layers": len(getattr(model, "blocks", [])), "forward_flops": forward_flops,
            "train_flops": 3 * forward_flops * args["batch_size"] * steps,
            "fused_flops": fxrep.count_flops(result.fused, (x1,)),
            "curve": [(h["step"], h["eval_accuracy"]) for h in result.history if "eval_accuracy" in h],
            "fused_path": str(out / "fused.pt")}


def int8_job(record: dict, args: dict) -> dict:
    """The int8 ExecuTorch program of a fused model: eval accuracy, predictions changed against fp32."""
    import torch

    from fxrep.export import calibration_inputs, load_executorch, run_executorch, to_executorch
    from fxrep.training import load_mnist_idx

    torch.set_num_threads(1)
    train_set, eval_set = load_mnist_idx(args["data"], "train"), load_mnist_idx(args["data"], "eval")
    fused = torch.load(record["fused_path"], weights_only=False)
    images, labels = eval_set.tensors
    path = Path(record["fused_path"]).with_name("int8.pte")
    to_executorch(fused, (images[:1],), path, quantize="int8", calibration=calibration_inputs(train_set))
    method = load_executorch(path)
    with torch.no_grad():
        fp32 = torch.cat([fused(images[i:i + 256]) for i in range(0, len(images), 256)]).argmax(-1)
    int8 = torch.stack([run_executorch(method, (img[None],))[0][0] for img in images]).argmax(-1)
    return {"row": record["row"], "seed": record["seed"], "int8_acc": (int8 == labels).float().mean().item(),
            "int8_changed": int((int8 != fp32).sum()), "fp32_acc": record["acc_after"],
            "int8_mb": path.stat().st_size / 1e6}


def _run_all(fn, jobs: list, workers: int, label: str) -> list:
    from tqdm import tqdm

    results = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(fn, *job) for job in jobs]
        for f in tqdm(as_completed(futures), total=len(futures), desc=label, unit="job"):
            results.append(f.result())
    return results


def _order(record: dict) -> tuple:
    """Table order: the baseline (and its check) first, then the plain and the branched rows."""
    names = ["deep-12", CHECK, *[r for r in ROWS if r != "deep-12"]]
    return names.index(record["row"]), record["seed"]


def _spread(values: list) -> str:
    mean = 100 * statistics.mean(values)
    sd = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} +- {sd:.2f}"


def _by_row(records: list) -> dict:
    rows: dict = {}
    for r in records:
        rows.setdefault(r["row"], []).append(r)
    return rows


def accuracy_table(records: list) -> str:
    from fxrep.benchmarking import markdown_table

    rows = []
    for row, rs in _by_row(records).items():
        label = ROWS[row][0] if row in ROWS else "deep 12-layer, 1.5x steps (convergence check)"
        rows.append((label, rs[0]["layers"], rs[0]["steps"], len(rs), _spread([r["acc_before"] for r in rs]),
                     _spread([r["acc_after"] for r in rs]), sum(r["changed"] for r in rs),
                     f"{rs[0]['params'] / 1e6:.2f} M", f"{rs[0]['train_flops'] / 1e12:.2f} T",
                     f"{rs[0]['fused_flops'] / 1e6:.1f} M"))
    return markdown_table(["model", "layers", "steps", "seeds", "eval acc % (unfused)", "eval acc % (fused)",
                           "predictions fuse changed", "params (fused)", "training FLOPs",
                           "inference FLOPs (fused, 1 image)"], rows)


def int8_table(records: list) -> str:
    from fxrep.benchmarking import markdown_table

    rows = [(ROWS[row][0], len(rs), _spread([r["fp32_acc"] for r in rs]),
             _spread([r["int8_acc"] for r in rs]), sum(r["int8_changed"] for r in rs),
             f"{rs[0]['int8_mb']:.1f}")
            for row, rs in _by_row(records).items()]
    return markdown_table(["model", "seeds", "fp32 eval acc %", "int8 eval acc %",
                           "int8 predictions that change (all seeds)", "int8 .pte MB"], rows)


def plot_curves(records: list, path: Path) -> None:
    """One panel per model: eval accuracy against steps, the mean over seeds and its range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _by_row(records)
    columns = min(3, len(rows))
    lines = -(-len(rows) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(3.6 * columns, 3.0 * lines), sharey=True, squeeze=False)
    for ax in axes.flat[len(rows):]:
        ax.axis("off")
    for ax, (row, rs) in zip(axes.flat, rows.items()):
        steps = [s for s, _ in rs[0]["curve"]]
        accs = [[a for _, a in r["curve"]] for r in rs]
        mean = [statistics.mean(col) for col in zip(*accs)]
        ax.fill_between(steps, [min(c) for c in zip(*accs)], [max(c) for c in zip(*accs)], alpha=0.3)
        ax.plot(steps, mean)
        ax.set_title(row, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylim(0.8, 1.0)
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("eval accuracy")
    fig.suptitle("MNIST eval accuracy during training: mean and range over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def conclusion(records: list) -> str:
    """The comparison stated plainly, from the fused accuracies."""
    rows = {row: [r["acc_after"] for r in rs] for row, rs in _by_row(records).items()}

    def mean_sd(row):
        v = rows[row]
        return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)

    lines = []
    deep = mean_sd("deep-12")
    for b in [b for b in BRANCHED if b in rows]:
        m, s = mean_sd(b)
        lines.append(f"{b} fused: {100 * m:.2f}% +- {100 * s:.2f} vs deep-12 {100 * deep[0]:.2f}% +- "
                     f"{100 * deep[1]:.2f} ({100 * (m - deep[0]):+.2f} points)")
        for plain in ("plain-3", "plain-3 x4"):
            if plain in rows and b == "d3b4":
                p = mean_sd(plain)
                spread = max(s, p[1])
                lines.append(f"d3b4 vs {plain}: {100 * (m - p[0]):+.2f} points, larger seed spread "
                             f"{100 * spread:.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "data" / "mnist-t10k"))
    ap.add_argument("--width", type=int, default=96)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3500)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--int8", action="store_true", help="int8 ExecuTorch programs of deep-12 and the best "
                                                        "branched row")
    ap.add_argument("--convergence-check", action="store_true", help="deep-12 at 1.5x the steps (first seed)")
    ap.add_argument("--out", default="runs/accuracy")
    ap.add_argument("--plot", default=None, help="PNG of the learning curves")
    args = ap.parse_args(argv)
    opts = {k: getattr(args, k) for k in ("data", "width", "heads", "steps", "batch_size", "lr", "eval_every",
                                           "out")}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    start = time.time()
    jobs = [(row, seed, opts) for seed in args.seeds for row in args.rows]
    if args.convergence_check:
        jobs.insert(0, (CHECK, args.seeds[0], opts))
    jobs.sort(key=lambda j: -(ROWS.get(j[0], ROWS["deep-12"])[3] + (j[0] == CHECK)))  # longest first
    records = _run_all(train_job, jobs, args.workers, "train")
    with open(Path(args.out) / "results.jsonl", "w") as f:
        for r in sorted(records, key=lambda r: (r["row"], r["seed"])):
            f.write(json.dumps(r) + "\n")
    records = [r for r in records if r["row"] in args.rows or r["row"] == CHECK]
    text = [f"MNIST, width {args.width} ({args.heads} heads), batch {args.batch_size}, lr {args.lr}, "
            f"{args.steps} steps, seeds {args.seeds}", accuracy_table(sorted(records, key=_order))]
    main_rows = [r for r in records if r["row"] != CHECK]
    if "deep-12" in args.rows:
        text.append(conclusion(main_rows))
    if args.int8:
        branched = {row: statistics.mean(r["acc_after"] for r in rs)
                    for row, rs in _by_row(main_rows).items() if row in BRANCHED}
        picked = ["deep-12"] + ([max(branched, key=branched.get)] if branched else [])
        int8 = _run_all(int8_job, [(r, opts) for r in main_rows if r["row"] in picked], args.workers, "int8")
        text.append(int8_table(sorted(int8, key=lambda r: (r["row"] != "deep-12", r["row"]))))
    if args.plot:
        plot_curves(sorted(main_rows, key=_order), Path(args.plot))
    text.append(f"wall time {time.time() - start:.0f} s")
    print("\n\n".join(text))
    (Path(args.out) / "table.md").write_text("\n\n".join(text) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
