"""Random, mostly non-conforming graph programs for differential fuzzing: ``fuse`` must raise a documented
FxrepError or return a model that computes the same function, and must leave the input model unchanged.
``fxrep.testing.strategies.random_graphs`` draws them; ``benchmarks/fuzz.py`` runs thousands."""

from __future__ import annotations

import dataclasses
import functools
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EquivalenceError, FxrepError
from .assertions import assert_fused_equivalent
from .generated import ACTIVATIONS, Case, explicit_timm_attention, randomize

FUZZ_OPS = ("linear", "shared_linear", "layer_norm", "functional_norm", "activation", "add", "scale_const",
            "scale_param", "mlp", "attention", "masked_attention", "reshape", "shuffle_view", "as_strided",
            "inplace", "inplace_act", "cached", "stack_sum", "computed_norm", "reduce_add", "mha",
            "sdpa_masked")


class CachedShift(nn.Module):
    """Adds a bias it caches per device on first use, as timm's LeViT attention does in eval mode."""

    def __init__(self, d: int):
        super().__init__()
        self.bias = nn.Parameter(torch.empty(d))
        self.cache: dict = {}

    def forward(self, x):
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.bias * 2.0
        return x + self.cache[key]


def _stacked_sum(a, b, how: int):
    if how == 0:
        return torch.stack([a, b]).sum(0)
    if how == 1:
        return torch.stack([a, b, a], -1).sum(-1)
    if how == 2:
        return torch.sum(torch.stack([a, b]), dim=0)
    return torch.stack([a, b], 1).mean(1)


@dataclass
class GraphSpec:
    """A random program over values of shape (batch, tokens, dim): each step applies one of FUZZ_OPS to
    earlier values; the model returns the sum of some values (or a tuple of them)."""

    dim: int = 8
    steps: list = field(default_factory=list)   # (op, input indices, option)
    outputs: list = field(default_factory=list)
    tuple_output: bool = False
    dtype: torch.dtype = torch.float32
    seed: int = 0


def _masked_sdpa(attn, a, b, opt: int):
    """timm's attention of ``a`` with ``is_causal``, or a mask computed from ``b``: shared by the heads
    (batch, 1, N, N) or one per head (batch, heads, N, N)."""
    scores = (b @ b.transpose(-1, -2)) * 0.1
    if opt % 3 == 0:
        return attn(a, is_causal=True)
    if opt % 3 == 1:
        return attn(a, attn_mask=scores.unsqueeze(1))
    return attn(a, attn_mask=torch.stack([scores * (1 - h) for h in range(attn.num_heads)], 1))


def _mha_masks(m: nn.MultiheadAttention, a, opt: int) -> dict:
    """No mask, an (L, L) float ``attn_mask``, or a boolean ``key_padding_mask`` (True: do not attend) that
    never masks key 0, all computed from ``a`` in ``m``'s layout."""
    tokens = a if m.batch_first else a.transpose(0, 1)  # (batch, L, d)
    if opt % 3 == 1:
        return {"attn_mask": (tokens[0] @ tokens[0].transpose(0, 1)) * 0.1}
    if opt % 3 == 2:
        padded = tokens.sum(-1) > 0.5
        return {"key_padding_mask": torch.cat([torch.zeros_like(padded[:, :1]), padded[:, 1:]], dim=1)}
    return {}


class RandomGraphModel(nn.Module):
    def __init__(self, spec: GraphSpec):
        super().__init__()
        self.spec = spec
        d = spec.dim
        self.mods = nn.ModuleList()
        self.params = nn.ParameterList()
        self.index = []   # per step: index into mods/params, or -1
        last_linear = None
        for op, _, opt in spec.steps:
            idx = -1
            if op == "linear" or (op == "shared_linear" and last_linear is None):
                self.mods.append(nn.Linear(d, d, bias=opt % 2 == 0))
                idx = last_linear = len(self.mods) - 1
            elif op == "shared_linear":
                idx = last_linear
            elif op in ("layer_norm", "functional_norm", "computed_norm"):
                self.mods.append(nn.LayerNorm(d, eps=(1e-5, 1e-6)[opt % 2]))
                idx = len(self.mods) - 1
            elif op == "mlp":
                h = 2 + opt % 7
                self.mods.append(nn.Sequential(nn.Linear(d, h), ACTIVATIONS[sorted(ACTIVATIONS)[opt % 4]](),
                                               nn.Linear(h, d)))
                idx = len(self.mods) - 1
            elif op in ("attention", "masked_attention", "sdpa_masked"):
                from timm.layers import Attention

                heads = (1, 2)[opt % 2] if d % 2 == 0 else 1
                self.mods.append(Attention(d, heads, qkv_bias=opt % 3 != 0))
                self.mods[-1].fused_attn = opt % 4 < 2
                idx = len(self.mods) - 1
            elif op == "mha":
                heads = (1, 2)[opt % 2] if d % 2 == 0 else 1
                self.mods.append(nn.MultiheadAttention(d, heads, bias=opt % 3 != 0, batch_first=opt % 4 < 2))
                idx = len(self.mods) - 1
            elif op == "scale_param":
                self.params.append(nn.Parameter(torch.empty(d)))
                idx = len(self.params) - 1
            elif op == "inplace_act":
                self.mods.append(nn.Sequential(nn.Linear(d, d),
                                               (nn.ReLU, nn.SiLU, nn.Hardswish)[opt % 3](inplace=True)))
                idx = len(self.mods) - 1
            elif op == "cached":
                self.mods.append(CachedShift(d))
                idx = len(self.mods) - 1
            self.index.append(idx)
        self.register_buffer("mask", torch.randn(1, 1, 1, 1))
        randomize(self, torch.Generator().manual_seed(spec.seed))
        self.to(spec.dtype).eval()

    def forward(self, x):
        values = [x]
        for (op, inputs, opt), idx in zip(self.spec.steps, self.index):
            a = values[inputs[0] % len(values)]
            b = values[inputs[1] % len(values)]
            if op in ("linear", "shared_linear", "layer_norm", "mlp"):
                y = self.mods[idx](a)
            elif op == "functional_norm":
                m = self.mods[idx]
                y = F.layer_norm(a, m.normalized_shape, m.weight, m.bias, m.eps)
            elif op == "computed_norm":  # the shape read off the input (Hugging Face style)
                m = self.mods[idx]
                y = F.layer_norm(a, a.shape[-1:], m.weight, m.bias, m.eps)
            elif op == "stack_sum":  # timm's ParallelThingsBlock joins branches this way
                y = _stacked_sum(a, b, opt % 4)
            elif op == "mha":  # with a float attn_mask or a boolean key_padding_mask computed from data
                y = self.mods[idx](a, a, a, need_weights=opt % 5 == 0,
                                   **_mha_masks(self.mods[idx], a, opt))[0]
            elif op == "sdpa_masked":
                y = _masked_sdpa(self.mods[idx], a, b, opt)
            elif op == "reduce_add":
                y = functools.reduce(operator.add, [a, b, a][: 2 + opt % 2])
            elif op == "activation":
                y = (F.gelu, F.relu, torch.tanh, F.silu)[opt % 4](a)
            elif op == "add":
                y = a + b
            elif op == "scale_const":
                y = a * (0.5 + opt % 3) if opt % 2 else a / (1.0 + opt % 3)
            elif op == "scale_param":
                y = a * self.params[idx]
            elif op == "attention":
                y = self.mods[idx](a)
            elif op == "masked_attention":
                y = self.mods[idx].proj(explicit_timm_attention(self.mods[idx], a, self.mask))
            elif op == "shuffle_view":
                # ShuffleNet's channel shuffle / Swin's windows: a view after contiguous
                t = a.unflatten(-1, (2, -1)).transpose(-1, -2).contiguous()
                y = t.view(a.shape) if opt % 2 else t.reshape(a.shape)
            elif op == "as_strided":  # reads the memory layout of a contiguous copy
                t = a.transpose(-1, -2).contiguous()
                y = t.as_strided(a.shape, (a.shape[1] * a.shape[2], a.shape[2], 1))
            elif op == "inplace":  # a value read before and after a write into it (or into a view of it)
                before = a * 1.0 if opt % 2 else a + 0.0
                target = before.transpose(-1, -2) if opt % 3 == 0 else before
                other = b.transpose(-1, -2) if opt % 3 == 0 else b
                target.mul_(0.5 + opt % 2) if opt % 4 < 2 else target.add_(other)
                y = before + a
            elif op == "inplace_act":  # nn.ReLU(inplace=True) after a Linear whose output is read again
                lin, act = self.mods[idx]
                h = lin(a)
                y = act(h) + h if opt % 2 else act(h)
            elif op == "cached":
                y = self.mods[idx](a)
            else:  # reshape round trip
                y = a.reshape(a.shape[0], -1).reshape(a.shape)
            values.append(y)
        outs = [values[i % len(values)] for i in self.spec.outputs] or [values[-1]]
        return tuple(outs) if self.spec.tuple_output else sum(outs)


def fuzz_check(case: Case) -> dict:
    """Fuse ``case.model``: either a documented FxrepError, or the same outputs and an unchanged input model.
    Returns {'applied': number of rewrites, 'error': str | None}; raises EquivalenceError on a wrong
    result."""
    try:
        fused = assert_fused_equivalent(case.model, case.inputs,
                                        rtol=5e-2 if case.info["spec"].dtype == torch.bfloat16 else None)
    except EquivalenceError:
        if not _exact_in_float64(case):
            raise
        return {"applied": 0, "error": "rounding: a float32 mismatch the float64 copy does not have"}
    except FxrepError as e:
        return {"applied": 0, "error": f"{type(e).__name__}: {e}"}
    return {"applied": len(fused.meta["fxrep_report"].applied), "error": None}


def _exact_in_float64(case: Case) -> bool:
    """The same graph in float64 fuses to within 1e-10: the float32 mismatch was rounding that the graph
    amplifies (a LayerNorm over two features divides by their difference), not a wrong rewrite. A wrong
    rewrite is wrong in every dtype."""
    if case.info["spec"].dtype == torch.float64:
        return False
    spec = dataclasses.replace(case.info["spec"], dtype=torch.float64)
    model = RandomGraphModel(spec)
    inputs = tuple(t.double() if t.is_floating_point() else t for t in case.inputs)
    try:
        assert_fused_equivalent(model, inputs)
    except EquivalenceError:
        return False
    except FxrepError:
        return True
    return True
