"""Accuracy on real data: the MNIST t10k set with the project's fixed split (8,000 train / 2,000 eval).

Same budget for every row (steps, batch, learning rate, seed); branched models train with progressive
joining (lam 0 -> 1) and are then fused; the table compares accuracy before and after fuse (and how many of
the 2,000 predictions differ), parameters, FLOPs and CPU latency (batch 1, median of interleaved runs).

    python benchmarks/accuracy_mnist.py [--data data/mnist-t10k] [--steps 500] [--out runs/accuracy]
                                        [--rows 0,3] [--int8]

``--int8``: each fused model is also quantized to int8 for phones (``fxrep.export.to_executorch``: PT2E,
XNNPACK quantizer, calibrated on 200 training images) and run with ExecuTorch on the 2,000 eval images:
int8 accuracy and how many predictions change against the fp32 model (issue #15: the fused model should lose
no more accuracy to int8 than the deep one).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import timm
import torch

import fxrep
import fxrep.models  # noqa: F401
from fxrep.benchmarking import markdown_table, measure_latency
from fxrep.training import TrainConfig, load_mnist_idx, train

ROWS = [  # (label, timm name, extra kwargs)
    ("deep 12-layer (baseline)", "vit_tiny_patch16_224", {"depth": 12}),
    ("branched d6b2, joined + fused", "fxrep_deit_tiny_d6b2", {}),
    ("branched d4b3, joined + fused", "fxrep_deit_tiny_d4b3", {}),
    ("branched d3b4, joined + fused", "fxrep_deit_tiny_d3b4", {}),
    ("plain shallow 3-layer", "vit_tiny_patch16_224", {"depth": 3}),
]
COMMON = dict(num_classes=10, img_size=28, patch_size=7, in_chans=1)


def int8_row(fused, train_set, eval_set, path: Path) -> dict:
    """int8 ExecuTorch program of ``fused``: its eval accuracy and predictions changed against fp32."""
    from fxrep.export import calibration_inputs, load_executorch, run_executorch, to_executorch

    images, labels = eval_set.tensors
    to_executorch(fused, (images[:1],), path, quantize="int8", calibration=calibration_inputs(train_set))
    method = load_executorch(path)
    with torch.no_grad():
        fp32 = torch.cat([fused(images[i:i + 256]) for i in range(0, len(images), 256)]).argmax(-1)
    int8 = torch.stack([run_executorch(method, (img[None],))[0][0] for img in images]).argmax(-1)
    return {"int8_acc": (int8 == labels).float().mean().item(), "int8_changed": int((int8 != fp32).sum()),
            "int8_mb": path.stat().st_size / 1e6}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "data" / "mnist-t10k"))
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/accuracy")
    ap.add_argument("--rows", default="all", help="comma-separated row numbers (0-4) or 'all'")
    ap.add_argument("--int8", action="store_true", help="also int8 ExecuTorch programs of the fused models")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    train_set, eval_set = load_mnist_idx(args.data, "train"), load_mnist_idx(args.data, "eval")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_to_run = range(len(ROWS)) if args.rows == "all" else [int(r) for r in args.rows.split(",")]
    results = []
    x1 = train_set[0][0].unsqueeze(0)
    for i in rows_to_run:
        label, name, extra = ROWS[i]
        torch.manual_seed(args.seed)
        model = timm.create_model(name, **COMMON, **extra)
        t0 = time.time()
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                          out_dir=str(out / name.replace("vit_tiny_patch16_224",
                                                         f"vit_d{extra.get('depth', 12)}")),
                          progress=True)
        result = train(model, train_set, eval_set, cfg)
        model.eval()
        fused = result.fused
        lat = measure_latency({"unfused": model, "fused": fused}, (x1,), repeats=30)
        row = {
            "model": label, "train_s": round(time.time() - t0),
            "acc_before": result.eval_accuracy, "acc_after": result.fused_accuracy,
            "pred_diff": result.prediction_mismatches,
            "params": fxrep.count_params(fused), "flops": fxrep.count_flops(fused, (x1,)),
            "lat_unfused_ms": lat["unfused"]["median"] * 1e3, "lat_fused_ms": lat["fused"]["median"] * 1e3,
            "layers": len(getattr(model, "blocks", [])),
        }
        if args.int8:
            row.update(int8_row(fused, train_set, eval_set, out / f"row{i}_int8.pte"))
        results.append(row)
        print(json.dumps(row), flush=True)
        (out / "results.jsonl").open("a").write(json.dumps(row) + "\n")
    headers = ["model", "layers", "eval acc before fuse", "after fuse", "predictions that differ", "params",
               "FLOPs (1 image)", "CPU latency unfused (ms)", "fused (ms)"]
    table = markdown_table(headers, [
        (r["model"], r["layers"], f"{100 * r['acc_before']:.2f}%", f"{100 * r['acc_after']:.2f}%",
         f"{r['pred_diff']} / {len(eval_set)}", f"{r['params'] / 1e6:.2f} M", f"{r['flops'] / 1e6:.1f} M",
         f"{r['lat_unfused_ms']:.2f}", f"{r['lat_fused_ms']:.2f}") for r in results])
    print(table)
    if args.int8:
        int8_table = markdown_table(
            ["model", "fp32 eval acc", "int8 eval acc", "int8 predictions that change", "int8 .pte MB"],
            [(r["model"], f"{100 * r['acc_after']:.2f}%", f"{100 * r['int8_acc']:.2f}%",
              f"{r['int8_changed']} / {len(eval_set)}", f"{r['int8_mb']:.1f}") for r in results])
        print(int8_table)
        table += "\n\n" + int8_table
    (out / "table.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
