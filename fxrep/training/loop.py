"""The training loop: progressive joining, AdamW + cosine LR, clipping, AMP on GPU, JSON-lines metrics,
safetensors checkpoints that resume exactly, optional distillation, DDP under ``torchrun``; fuses at the end.

The data order is a function of the seed and the epoch alone (every process, single or distributed, samples
through a ``DistributedSampler``), so a run resumed at step ``s`` reads the batches an uninterrupted run reads
after step ``s``, and takes the same steps (``tests/test_training.py`` checks the losses)."""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from ..models.branched_vit import set_join
from .checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from .schedule import JoinSchedule


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_lr_steps: int = 10
    clip_grad: float | None = 1.0
    join_warmup: float = 0.1
    join_ramp: float = 0.6
    join_shape: str = "cosine"
    amp: bool = True             # used on CUDA only
    seed: int = 0
    eval_every: int = 0          # 0: only at the end
    checkpoint_every: int = 0    # 0: only at the end
    stop_at: int | None = None   # leave after this step with a checkpoint, as if interrupted (resume later)
    label_smoothing: float = 0.0
    num_workers: int = 0         # data loading processes
    kd_alpha: float = 0.0        # weight of distillation from ``teacher``
    kd_tau: float = 2.0
    progress: bool = True
    out_dir: str | None = None
    fuse_at_end: bool = True


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    eval_accuracy: float | None
    history: list = field(default_factory=list)
    fused: torch.nn.Module | None = None
    fused_accuracy: float | None = None
    prediction_mismatches: int | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _distributed() -> tuple[int, int]:
    """(rank, world size); initializes the process group under torchrun (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def evaluate(model, data, batch_size: int = 256, device="cpu") -> tuple[float, torch.Tensor]:
    """(accuracy, predictions) of ``model`` on ``data``."""
    model.eval()
    preds = []
    labels = []
    for x, y in DataLoader(data, batch_size=batch_size):
        preds.append(model(x.to(device)).argmax(-1).cpu())
        labels.append(y)
    p, y = torch.cat(preds), torch.cat(labels)
    return (p == y).float().mean().item(), p


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_lr_steps:
        return cfg.lr * (step + 1) / cfg.warmup_lr_steps
    t = (step - cfg.warmup_lr_steps) / max(1, cfg.steps - cfg.warmup_lr_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


@dataclass
class _Run:
    """Everything one training run sets up before its first step."""

    device: torch.device
    schedule: JoinSchedule
    optimizer: torch.optim.Optimizer
    net: torch.nn.Module
    loader: DataLoader
    sampler: DistributedSampler
    scaler: torch.amp.GradScaler
    use_amp: bool
    out: Path | None
    model: torch.nn.Module  # the model itself (``net`` may wrap it for DDP)


def train(model, train_data, eval_data=None, config: TrainConfig | None = None, teacher=None,
          resume: bool = False) -> TrainResult:
    """Train a branched model with progressive joining (``lam`` from 0 to 1) and return the result; with
    ``fuse_at_end`` the joined model is fused and its eval predictions compared with the unfused ones."""
    cfg = config or TrainConfig()
    rank, world = _distributed()
    seed_everything(cfg.seed + rank)
    run = _set_up(model, train_data, cfg, rank, world)
    step, history = 0, []
    if resume and has_checkpoint(run.out):
        step, history = load_checkpoint(run.out / "checkpoint", model, run.optimizer, run.scaler, rank)
    if world > 1:
        run.net = torch.nn.parallel.DistributedDataParallel(model)
    if teacher is not None:
        teacher.to(run.device).eval()
    step, loss_value = _loop(model, run, cfg, teacher, eval_data, rank, world, step, history)
    result = TrainResult(step, loss_value, None, history)
    if run.out is not None:
        save_checkpoint(run.out / "checkpoint", model, run.optimizer, run.scaler, step, history, rank, world)
        if rank == 0:
            (run.out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    if step < cfg.steps:  # stopped early (stop_at): the checkpoint is the result; resume to finish
        if world > 1:
            dist.barrier()
        return result
    set_join(model, run.schedule(cfg.steps))
    if rank == 0:
        preds = None
        if eval_data is not None:
            result.eval_accuracy, preds = evaluate(model, eval_data, device=run.device)
        if cfg.fuse_at_end:
            _fuse_and_save(model, eval_data, train_data, result, run.out, run.device, preds)
    if world > 1:
        dist.barrier()
    return result


def _set_up(model, train_data, cfg: TrainConfig, rank: int, world: int) -> _Run:
    device = torch.device("cuda", rank % max(1, torch.cuda.device_count())) if torch.cuda.is_available() \
        else torch.device("cpu")
    model.to(device)
    schedule = JoinSchedule(cfg.steps, cfg.join_warmup, cfg.join_ramp, cfg.join_shape)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    out = Path(cfg.out_dir) if cfg.out_dir else None
    if out is not None and rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    # one process or many: the order of an epoch follows from (seed, epoch) alone
    sampler = _ResumableSampler(train_data, world, rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(_SeededSamples(train_data, cfg.seed), batch_size=cfg.batch_size, sampler=sampler,
                        num_workers=cfg.num_workers, drop_last=len(sampler) >= cfg.batch_size,
                        persistent_workers=cfg.num_workers > 0,
                        generator=torch.Generator().manual_seed(cfg.seed))  # leaves the global RNG alone
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    return _Run(device, schedule, optimizer, model, loader, sampler, scaler, use_amp, out, model)


class _ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that yields ``(epoch, index)`` keys (for ``_SeededSamples``) and can leave out
    the first samples of an epoch: those a run had used before it was interrupted (``skip``, reset to 0 by
    ``set_epoch``)."""

    skip = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.skip = 0

    def __iter__(self):
        return iter([(self.epoch, i) for i in list(super().__iter__())[self.skip:]])

    def __len__(self) -> int:
        return super().__len__() - self.skip


class _SeededSamples(torch.utils.data.Dataset):
    """A data set whose sample ``i`` of epoch ``e`` draws its random augmentation from a generator seeded by
    (seed, e, i): the same crops and flips in any process, worker or resumed run, whatever ran before."""

    def __init__(self, data, seed: int):
        self.data, self.seed = data, seed

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_003 + index) % 2 ** 63)
            return self.data[index]


def _record(run: _Run, cfg: TrainConfig, eval_data, rank: int, step: int, loss: float, lam: float) -> dict:
    record = {"step": step, "loss": loss, "lam": lam, "lr": run.optimizer.param_groups[0]["lr"],
              "time": time.time()}
    if cfg.eval_every and eval_data is not None and step % cfg.eval_every == 0 and rank == 0:
        record["eval_accuracy"] = evaluate(run.model, eval_data, device=run.device)[0]
    return record


def _loop(model, run: _Run, cfg: TrainConfig, teacher, eval_data, rank: int, world: int, step: int,
          history: list) -> tuple[int, float]:
    """Train from ``step`` to ``cfg.steps`` (or ``cfg.stop_at``), appending one record per step to
    ``history`` (and to metrics.jsonl); returns the step reached and the last loss. A run that starts at
    ``step > 0`` continues the epoch where that step left it."""
    metrics_file = open(run.out / "metrics.jsonl", "a") if run.out is not None and rank == 0 else None  # noqa: SIM115
    bar = None
    if cfg.progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step")
    last = min(cfg.steps, cfg.stop_at) if cfg.stop_at is not None else cfg.steps
    epoch, done_in_epoch = divmod(step, max(1, len(run.loader)))
    loss_value = float("nan")
    try:
        while step < last:
            run.sampler.set_epoch(epoch)
            run.sampler.skip = done_in_epoch * cfg.batch_size
            done_in_epoch = 0
            for x, y in run.loader:
                lam = run.schedule(step)
                loss_value = _step(model, run, cfg, teacher, x, y, lam, step)
                step += 1
                record = _record(run, cfg, eval_data, rank, step, loss_value, lam)
                history.append(record)
                if metrics_file is not None:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_value:.3f}", lam=f"{lam:.2f}")
                if run.out is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    save_checkpoint(run.out / "checkpoint", model, run.optimizer, run.scaler, step, history,
                                    rank, world)
                if step >= last:  # before the loader draws the next batch (its augmentation uses the RNG)
                    break
            epoch += 1
    finally:
        if bar is not None:
            bar.close()
        if metrics_file is not None:
            metrics_file.close()
    return step, loss_value


def _step(model, run: _Run, cfg: TrainConfig, teacher, x, y, lam: float, step: int) -> float:
    """One optimizer step at join coefficient ``lam``: cross-entropy (plus distillation from ``teacher``)."""
    run.net.train()
    set_join(model, lam)
    for group in run.optimizer.param_groups:
        group["lr"] = _lr_at(step, cfg)
    x, y = x.to(run.device), y.to(run.device)
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.use_amp):
        logits = run.net(x)
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        if teacher is not None and cfg.kd_alpha > 0:
            with torch.no_grad():
                t_logits = teacher(x)
            kd = F.kl_div(F.log_softmax(logits / cfg.kd_tau, -1), F.softmax(t_logits / cfg.kd_tau, -1),
                          reduction="batchmean") * cfg.kd_tau ** 2
            loss = (1 - cfg.kd_alpha) * loss + cfg.kd_alpha * kd
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if cfg.clip_grad:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return loss.item()


def _fuse_and_save(model, eval_data, train_data, result, out, device, preds) -> None:
    import fxrep

    model.eval()
    example = train_data[0][0].unsqueeze(0).to(device)
    fused = fxrep.fuse(model, example_inputs=(example,), check=True)
    result.fused = fused
    if eval_data is not None:
        result.fused_accuracy, fused_preds = evaluate(fused, eval_data, device=device)
        result.prediction_mismatches = int((fused_preds != preds).sum())
    if out is not None:
        from safetensors.torch import save_file

        torch.save(fused, out / "fused.pt")
        save_file({k: v.detach().contiguous().cpu() for k, v in fused.state_dict().items()},
                  str(out / "fused.safetensors"))
        (out / "fuse_report.txt").write_text(str(fused.meta["fxrep_report"]))
