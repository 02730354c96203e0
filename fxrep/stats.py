"""Counts that describe a graph: ops by kind, parameters, and FLOPs (via torch's FlopCounterMode)."""

from __future__ import annotations

import torch
from torch import fx
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .ir import activation_key, as_layer_norm
from .ir.readers import is_softmax
from .ir.targets import LINEAR_TARGETS, SDPA_TARGETS
from .ops import multi_head_attention


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# FlopCounterMode has formulas for the CUDA attention kernels only: on the CPU, SDPA runs as this op and its
# two products went uncounted (a third of a DeiT-Tiny's FLOPs at 224 px)
CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def run_counting_flops(model, example_inputs) -> tuple:
    """(output, total FLOPs) of one forward pass, counted by ``torch.utils.flop_counter.FlopCounterMode``
    (with a formula for the CPU attention kernel added)."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        out = model(*example_inputs)
    return out, int(counter.get_total_flops())


def count_flops(model, example_inputs) -> int:
    """Total FLOPs of one forward pass, counted by ``torch.utils.flop_counter.FlopCounterMode``."""
    return run_counting_flops(model, example_inputs)[1]


def count_params(module: torch.nn.Module) -> int:
    """Unique parameter and buffer elements reachable from ``module``."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel()
    return total


def graph_stats(gm: fx.GraphModule, example_inputs=None, flops: int | None = None) -> dict:
    """Op counts by kind, parameters, and FLOPs (``flops`` if given, else counted on ``example_inputs``)."""
    linears = softmax = sdpa = acts = layer_norms = 0
    for n in gm.graph.nodes:
        target_mod = gm.get_submodule(n.target) if n.op == "call_module" else None
        if ((n.op == "call_function" and n.target in LINEAR_TARGETS)
                or isinstance(target_mod, torch.nn.Linear)):
            linears += 1
        elif (n.op == "call_function" and n.target in SDPA_TARGETS) or n.target is multi_head_attention:
            sdpa += 1
        elif is_softmax(n) or isinstance(target_mod, torch.nn.Softmax):
            softmax += 1
        elif (activation_key(n) is not None
              or isinstance(target_mod, (torch.nn.GELU, torch.nn.ReLU, torch.nn.SiLU))):
            acts += 1
        elif as_layer_norm(n) is not None or isinstance(target_mod, torch.nn.LayerNorm):
            layer_norms += 1
    stats = {"ops": sum(1 for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")),
             "linear": linears, "sdpa": sdpa, "softmax": softmax, "activation": acts,
             "layer_norm": layer_norms, "params": count_params(gm)}
    if flops is not None:
        stats["flops"] = flops
    elif example_inputs is not None:
        try:
            stats["flops"] = count_flops(gm, example_inputs)
        except Exception:  # noqa: BLE001 - FLOPs are informative; a failure here must not hide the fuse result
            stats["flops"] = "n/a"
    return stats
