"""Fusing a model that lives on any device: fxrep does its float64 weight algebra on a CPU twin of the traced
graph and moves the fused model back, with the input's dtypes. The user's tensors are never moved or copied in
place: the twin holds CPU copies of them."""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from .errors import UnsupportedModelError

CPU = torch.device("cpu")


def model_device(model: nn.Module) -> torch.device:
    """The one device of ``model``'s parameters and buffers (CPU for a model with none)."""
    devices = {t.device for t in list(model.parameters()) + list(model.buffers())}
    if len(devices) > 1:
        names = ", ".join(sorted(str(d) for d in devices))
        raise UnsupportedModelError(
            f"the model's parameters and buffers are on several devices ({names}): fxrep fuses a model that "
            "lives on one device. Move it to one first (model.to(device)), fuse, then place the fused model.")
    return devices.pop() if devices else CPU


def cpu_twin(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose parameters and buffers are CPU copies of its own (same dtypes, same sharing
    between attributes): the device's memory holds no second copy, and ``gm``'s tensors are untouched."""
    memo: dict = {}
    for t in list(gm.parameters()) + list(gm.buffers()):
        if id(t) not in memo:
            cpu = t.detach().to(CPU, copy=True)
            is_param = isinstance(t, nn.Parameter)
            memo[id(t)] = nn.Parameter(cpu, requires_grad=t.requires_grad) if is_param else cpu
    for module in gm.modules():  # tensors kept as plain attributes (fx's _tensor_constant*, caches)
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and id(value) not in memo:
                memo[id(value)] = value.detach().to(CPU, copy=True)
    twin = copy.deepcopy(gm, memo)
    twin.meta = gm.meta
    return twin


def to_device(values, device: torch.device):
    """Tensors of ``values`` (a tuple, possibly nested) on ``device``; anything else as is."""
    return fx.node.map_aggregate(values, lambda v: v.to(device) if isinstance(v, torch.Tensor) else v)
