"""CPU (or GPU) latency of fused branched ViTs against a deep DeiT-Tiny, side by side in one process.

    python benchmarks/latency.py [--batch 1 8] [--threads 2 1] [--repeats 30] [--onnx] [--compile]
                                 [--plot FILE] [--device cuda --dtype float16]
    python benchmarks/latency.py --parallel-vit [--threads 2] [--repeats 20]
    python benchmarks/latency.py --executorch [--executorch-only] [--threads 2] [--repeats 30] [--plot FILE]

Models (random weights; fusing is exact, so weights do not change speed):
- baseline: timm ``vit_tiny_patch16_224`` (12 layers, 3 heads of 64, MLP 768);
- fxrep_deit_tiny_{d6b2,d4b3,d3b4} fused at lam = 1 (collapsed), with the rank-aware attention form and with
  the per-head form; and fused at lam = 0 (widened only: same FLOPs, fewer layers);
- every fused model computes only the rows its output reads (``fxrep.fuse``'s default, ``prune_rows``); the
  fused d6b2/d4b3/d3b4 rank-aware forms also with every row (``prune_rows=False``), and the baseline through
  ``fxrep.fuse`` (nothing to merge: the rows alone);
- ``hand-written d3``: a timm VisionTransformer built directly in the shape of the fused d3b4 per-head form
  (3 blocks, 3 heads of q/k/v width 256, MLP 768), to show the fused GraphModule adds no overhead.
Runs are interleaved (every model once per round), warm-up excluded, medians with min-max;
``torch.inference_mode``.

``--parallel-vit``: timm's own branched ViT, ``vit_small_patch16_18x2_224`` (18 blocks of 2 parallel
attention and MLP branches, width 384), at 224 px and at 64 px, batch 1: unfused; fused with the default cost
model (the shipped kernel-time table) deciding each widen group; with ``autotune=True``; and with every group
widened and with none, to see what widening buys per shape (targets: fused <= 1.00x unfused at 224 px,
<= 0.92x at 64 px).

``--executorch``: phones. The 12-layer baseline and the fused d6b2, d4b3, d3b4 (rank-aware) and d3b4
(per-head) as ExecuTorch programs lowered to XNNPACK (``fxrep.export.to_executorch``), fp32 and int8 (PT2E;
calibrated on random images, which sets the scales but not the speed), batch 1, 224 px, run with
``executorch.runtime`` on this CPU, interleaved: medians, min-max and ``.pte`` sizes (targets: fused d3b4
fp32 <= 0.35x and int8 <= 0.25x the deep fp32 program). Every program gets fxrep's XNNPACK rewrites
(``fxrep.export.xnnpack``) and computes only the rows its output reads (``fxrep.export.rows``: the last block
for the class token alone), the deep baseline too, and the ratios compare programs lowered alike. Listed for
reference: the deep model and the fused d3b4 with every row computed (``prune_rows=False``), and the deep
model lowered as exported (what ``to_edge_transform_and_lower`` does by itself).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import timm
import torch
from timm.layers import Attention

import fxrep
import fxrep.models  # noqa: F401
from fxrep.benchmarking import markdown_table, measure_latency


def fused(name: str, lam: float, x, rank_aware: bool = True, dtype=torch.float32, prune_rows: bool = True):
    model = timm.create_model(name, num_classes=1000, init_values=0.1).eval()
    model.set_join(lam)
    registry = fxrep.default_registry()
    if not rank_aware:
        registry = registry.without("rank_aware_attention")
    return fxrep.fuse(model.to(dtype), example_inputs=(x.to(dtype),), patterns=registry,
                      prune_rows=prune_rows)


def hand_written_d3() -> torch.nn.Module:
    model = timm.create_model("vit_tiny_patch16_224", depth=3, num_classes=1000).eval()
    for blk in model.blocks:
        blk.attn = Attention(192, 3, attn_head_dim=256, qkv_bias=True).eval()
    return model


def build(x, dtype) -> dict:
    baseline = timm.create_model("vit_tiny_patch16_224", num_classes=1000).eval().to(dtype)
    models = {"baseline DeiT-Tiny (12 layers)": baseline,
              "baseline through fxrep.fuse (rows read only)": fxrep.fuse(baseline,
                                                                          example_inputs=(x.to(dtype),))}
    for v in ("d6b2", "d4b3", "d3b4"):
        models[f"{v} collapsed, rank-aware"] = fused(f"fxrep_deit_tiny_{v}", 1.0, x, True, dtype)
        models[f"{v} collapsed, per-head"] = fused(f"fxrep_deit_tiny_{v}", 1.0, x, False, dtype)
        models[f"{v} collapsed, rank-aware{ALL_ROWS}"] = fused(f"fxrep_deit_tiny_{v}", 1.0, x, True, dtype,
                                                               prune_rows=False)
    for v in ("d6b2", "d3b4"):
        models[f"{v} widened (lam=0)"] = fused(f"fxrep_deit_tiny_{v}", 0.0, x, True, dtype)
    models["hand-written d3 (fused d3b4 per-head shape)"] = hand_written_d3().to(dtype)
    return models


def parallel_vit(threads: int, repeats: int) -> str:
    """timm's parallel ViT unfused; fused with the default cost model (fxrep's kernel-time table) deciding
    each widen group; fused with ``autotune=True`` (timed on this machine); with every group widened and with
    none (both forced by replaying decisions)."""
    torch.set_num_threads(threads)
    rows, decisions = [], []
    for px in (224, 64):
        model = timm.create_model("vit_small_patch16_18x2_224", img_size=px, num_classes=1000).eval()
        x = torch.randn(1, 3, px, px)
        decided = fxrep.fuse(model, example_inputs=(x,))
        tuned = fxrep.fuse(model, example_inputs=(x,), autotune=True)
        keys = decided.meta["fxrep_report"].decisions
        models = {"unfused": model, "fused, default (table) decides": decided,
                  "fused, autotune=True decides": tuned,
                  "fused, every group widened": fxrep.fuse(model, example_inputs=(x,),
                                                           decisions=dict.fromkeys(keys, True)),
                  "fused, no widening": fxrep.fuse(model, example_inputs=(x,),
                                                   decisions=dict.fromkeys(keys, False))}
        for label, gm in (("table", decided), ("autotune", tuned)):
            for key, d in gm.meta["fxrep_report"].decisions.items():
                verdict = "widen" if d.widen else "apart"
                decisions.append(f"{px} px, {label}: {verdict}  {key}: {d.describe()}")
        timed = measure_latency(models, (x,), repeats=repeats, warmup=3)
        base = timed["unfused"]["median"]
        rows += [(px, (px // 16) ** 2 + 1, name, f"{t['median'] * 1e3:.1f}",
                  f"{t['min'] * 1e3:.1f}-{t['max'] * 1e3:.1f}",
                  f"{t['median'] / base:.2f}x") for name, t in timed.items()]
        print(f"  done: {px} px", flush=True)
    return "\n".join(decisions) + "\n\n" + markdown_table(["px", "tokens", "model", "median ms", "min-max ms",
                                                          "vs unfused"], rows)


AS_EXPORTED = "deep DeiT-Tiny-12, lowered as exported"
ALL_ROWS = ", all rows"


def executorch_rows(threads: int, repeats: int, plot_path: str | None) -> str:
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    from fxrep.export import load_executorch, to_executorch

    _unsafe_reset_threadpool(threads)
    torch.set_num_threads(threads)
    x = torch.randn(1, 3, 224, 224)
    calibration = [(torch.randn(1, 3, 224, 224),) for _ in range(8)]
    models = {"deep DeiT-Tiny-12": timm.create_model("vit_tiny_patch16_224", num_classes=1000).eval()}
    for v in ("d6b2", "d4b3", "d3b4"):
        models[f"fused {v}, rank-aware"] = fused(f"fxrep_deit_tiny_{v}", 1.0, x, True)
    models["fused d3b4, per-head"] = fused("fxrep_deit_tiny_d3b4", 1.0, x, False)
    # what computing only the class token's rows in the last block (fxrep.export.rows) buys: fp32 without it
    models["deep DeiT-Tiny-12" + ALL_ROWS] = models["deep DeiT-Tiny-12"]
    models["fused d3b4, rank-aware" + ALL_ROWS] = fused("fxrep_deit_tiny_d3b4", 1.0, x, True,
                                                        prune_rows=False)
    models[AS_EXPORTED] = models["deep DeiT-Tiny-12"]
    out = Path(tempfile.mkdtemp(prefix="fxrep_pte_"))
    programs, sizes = {}, {}
    for name, model in models.items():
        for precision in ("fp32",) if name.endswith(ALL_ROWS) else ("fp32", "int8"):
            path = to_executorch(model, (x,), out / f"{len(programs)}.pte",
                                 quantize=None if precision == "fp32"
                                 else "int8", calibration=calibration, xnnpack_rewrites=name != AS_EXPORTED,
                                 prune_rows=name != AS_EXPORTED and not name.endswith(ALL_ROWS))
            method = load_executorch(path)
            programs[f"{name}|{precision}"] = lambda t, m=method: m.execute([t])
            sizes[f"{name}|{precision}"] = path.stat().st_size
            print(f"  lowered {name} ({precision}): {sizes[f'{name}|{precision}'] / 1e6:.1f} MB", flush=True)
    timed = measure_latency(programs, (x,), repeats=repeats, warmup=3)
    base, plain = timed["deep DeiT-Tiny-12|fp32"]["median"], timed[f"{AS_EXPORTED}|fp32"]["median"]
    rows = [(k.split("|")[0], k.split("|")[1], f"{t['median'] * 1e3:.2f}",
             f"{t['min'] * 1e3:.2f}-{t['max'] * 1e3:.2f}",
             f"{t['median'] / base:.3f}x", f"{t['median'] / plain:.3f}x", f"{sizes[k] / 1e6:.1f}")
            for k, t in timed.items()]
    if plot_path:
        plot([(threads, 1, "eager", f"{r[0]} ({r[1]})", 0, 0, 0, timed[f"{r[0]}|{r[1]}"]["median"] / base)
              for r in rows], plot_path, "latency relative to the deep fp32 program (ExecuTorch, XNNPACK, "
                                         "batch 1)")
    return (f"ExecuTorch (XNNPACK), {threads} threads, batch 1, 224 px, {repeats} interleaved rounds\n" +
            markdown_table(["model", "precision", "median ms", "min-max ms", "vs deep fp32",
                            "vs deep fp32 as exported", ".pte MB"], rows))


def onnx_sessions(models: dict, x, prune_rows: bool = True) -> dict:
    import onnxruntime as ort

    from fxrep.export import to_onnx

    out = {}
    tmp = Path(tempfile.mkdtemp())
    for name, m in models.items():
        path = to_onnx(m, (x,), tmp / f"{abs(hash(name))}.onnx", prune_rows=prune_rows)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        # ORT's worker threads spin between runs by default and would steal the cores from the interleaved
        # PyTorch runs
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feed_name = sess.get_inputs()[0].name
        out[name] = lambda inp, s=sess, n=feed_name: s.run(None, {n: inp.numpy()})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--onnx", action="store_true", help="also ONNX Runtime (batch 1 only)")
    ap.add_argument("--compile", action="store_true", help="also torch.compile (batch 1 only)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--plot", default=None, help="write a PNG bar chart here")
    ap.add_argument("--parallel-vit", action="store_true", help="timm's vit_small_patch16_18x2_224 instead")
    ap.add_argument("--executorch", action="store_true",
                    help="ExecuTorch/XNNPACK programs, fp32 and int8, after the eager (and ONNX) table")
    ap.add_argument("--executorch-only", action="store_true", help="with --executorch: that table alone")
    args = ap.parse_args(argv)
    if args.executorch and args.executorch_only:
        print(executorch_rows(args.threads[0], args.repeats, args.plot))
        return 0
    if args.parallel_vit:
        print(parallel_vit(args.threads[0], args.repeats))
        return 0
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    x0 = torch.randn(1, 3, 224, 224)
    models = {k: m.to(device) for k, m in build(x0, dtype).items()}
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads "
          f"available, torch {torch.__version__}, device {device}, {args.dtype}")
    base_name = next(iter(models))
    all_rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in args.batch:
            x = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
            variants = {("eager", k): m for k, m in models.items()}
            if args.compile and batch == 1:
                for k in (base_name, "d3b4 collapsed, rank-aware", "d3b4 collapsed, per-head"):
                    variants[("compile", k)] = torch.compile(models[k])
            if args.onnx and batch == 1 and device.type == "cpu" and dtype == torch.float32:
                names = (base_name, "d3b4 collapsed, rank-aware", "d3b4 collapsed, per-head")
                for k, fn in onnx_sessions({k: models[k] for k in names}, x).items():  # only the rows read
                    variants[("onnxruntime", k)] = fn
                every_row = f"d3b4 collapsed, rank-aware{ALL_ROWS}"  # fused and exported with every row
                for k, fn in onnx_sessions({every_row: models[every_row]}, x, prune_rows=False).items():
                    variants[("onnxruntime", k)] = fn
            timed = measure_latency({f"{b}|{k}": m for (b, k), m in variants.items()}, (x,),
                                    repeats=args.repeats, warmup=5)
            for (backend, name) in variants:
                t = timed[f"{backend}|{name}"]
                base = timed.get(f"{backend}|{base_name}", {}).get("median")
                all_rows.append((threads, batch, backend, name, t["median"] * 1e3, t["min"] * 1e3,
                                 t["max"] * 1e3,
                                 t["median"] / base if base else float("nan")))
            print(f"  done: {threads} threads, batch {batch}", flush=True)
    table = markdown_table(["threads", "batch", "backend", "model", "median ms", "min-max ms", "vs baseline"],
                           [(a, b, c, d, f"{e:.2f}", f"{f:.2f}-{g:.2f}", f"{h:.2f}x")
                            for a, b, c, d, e, f, g, h in all_rows])
    print(table)
    if args.plot:
        plot(all_rows, args.plot)
    if args.executorch:  # the same run: eager, ONNX Runtime and ExecuTorch side by side
        print(executorch_rows(args.threads[0], args.repeats, None))
    return 0


def plot(rows, path, label="latency relative to the 12-layer baseline (eager, batch 1)"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r[2] == "eager" and r[1] == 1 and r[0] == max(q[0] for q in rows)]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.barh([r[3] for r in sel][::-1], [r[7] for r in sel][::-1], color="tab:blue")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel(label)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    raise SystemExit(main())
