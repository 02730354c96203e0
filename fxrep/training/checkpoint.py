"""Checkpoints that resume exactly: weights (safetensors), optimizer, gradient scaler, step, metrics, and the
random state of every process, so that a resumed run takes the very steps an uninterrupted one would."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist


def _random_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _gather_random_states(world: int) -> list:
    """Every process's random state, in rank order (a collective: all ranks call it)."""
    if world == 1:
        return [_random_state()]
    states: list = [None] * world
    dist.all_gather_object(states, _random_state())
    return states


def save_checkpoint(path: Path, model, optimizer, scaler, step: int, history: list, rank: int = 0,
                    world: int = 1) -> None:
    """Write the checkpoint of ``step`` (all ranks call it; rank 0 writes). Weights as safetensors
    (``model.safetensors``); optimizer, scaler, step, metrics and random states as ``trainer.pt``."""
    from safetensors.torch import save_file

    states = _gather_random_states(world)
    if rank != 0:
        return
    path.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(weights, str(path / "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step,
                "history": history, "rng": states}, path / "trainer.pt")


def load_checkpoint(path: Path, model, optimizer, scaler, rank: int = 0) -> tuple[int, list]:
    """Restore a checkpoint written by ``save_checkpoint``; return (step, metrics history). Each rank takes
    back its own random state (a checkpoint of another world size gives rank 0's to the ranks it lacks)."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path / "model.safetensors")))
    state = torch.load(path / "trainer.pt", weights_only=False, map_location="cpu")
    optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    states = state["rng"] if isinstance(state["rng"], list) else [{"torch": state["rng"]}]
    mine = states[rank] if rank < len(states) else states[0]
    torch.set_rng_state(mine["torch"])
    if "cuda" in mine and torch.cuda.is_available():
        torch.cuda.set_rng_state(mine["cuda"])
    return state["step"], state["history"]


def has_checkpoint(out: Path | None) -> bool:
    return out is not None and (out / "checkpoint" / "model.safetensors").is_file()
