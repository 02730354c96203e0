"""Branched blocks written the way users write them, each built from a spec that says what ``fuse`` should
do with it (``expect``), so tests can assert structure as well as values. Plain nn.Modules: no hypothesis
here (``fxrep.testing.strategies`` draws the specs)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Case:
    """One generated example: a model in eval mode and inputs for it, plus what the generator intended."""

    model: nn.Module
    inputs: tuple
    info: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Case({self.info})"


ACTIVATIONS = {"gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "relu": nn.ReLU,
               "silu": nn.SiLU}
MLP_NEAR_MISSES = ("eps", "activation", "input", "leak", "shared_linear")


@dataclass
class MlpSpec:
    """What ``GeneratedMlpBlock`` builds. ``lam=None`` sums independent branches (widening only)."""

    dim: int = 8
    hidden: int = 16
    branches: int = 2
    bias: bool = True
    norm: str = "per_branch"        # per_branch | shared | none
    functional_norm: bool = False   # F.layer_norm on parameters instead of nn.LayerNorm
    layerscale: bool = True
    activation: str = "gelu"
    lam: float | None = 1.0
    average: bool = False           # divide the branch sum by B
    dtype: torch.dtype = torch.float32
    near_miss: str | None = None
    seed: int = 0

    def expect(self) -> dict:
        """Activation count and sorted hidden widths fuse must produce (None: not asserted).

        Joined branches (lam == 1) see one pre-activation and collapse to the single-branch width; other
        branches that read one input with one activation widen into one op; a branch with another
        activation, or reading another input when not joined, stays apart.
        """
        B, h = self.branches, self.hidden
        joined = self.lam == 1.0 or B == 1
        if self.near_miss == "leak" and B > 1:
            return {"activations": None, "widths": None}
        if self.near_miss == "activation" and B > 1:
            return {"activations": 2, "widths": [h, h] if joined else sorted([h, (B - 1) * h])}
        if self.near_miss in ("eps", "input") and B > 1 and not joined:
            if self.lam not in (None, 0.0):
                # 0 < lam < 1 mixes every branch's pre-activation with the odd one out: nothing shares an
                # input
                return {"activations": B, "widths": [h] * B}
            return {"activations": 2, "widths": sorted([h, (B - 1) * h])}
        if self.near_miss == "shared_linear" and self.norm != "per_branch" and not joined:
            # branches 0 and 1 compute the same pre-activation: one copy is enough
            return {"activations": 1, "widths": [h * (B - 1)]}
        return {"activations": 1, "widths": [h if joined else h * B]}


class GeneratedMlpBlock(nn.Module):
    """``x + sum_i ls_i * fc2_i(phi((1 - lam) z_i + lam mean_j z_j))`` with ``z_i = fc1_i(norm_i(x))``."""

    def __init__(self, spec: MlpSpec):
        super().__init__()
        self.spec = spec
        g = torch.Generator().manual_seed(spec.seed)
        B, d, h = spec.branches, spec.dim, spec.hidden
        n_norms = {"per_branch": B, "shared": 1, "none": 0}[spec.norm]
        eps = [1e-5] * n_norms
        if spec.near_miss == "eps" and n_norms > 1:
            eps[-1] = 1e-6
        self.norms = nn.ModuleList(nn.LayerNorm(d, eps=e) for e in eps)
        self.fc1 = nn.ModuleList(nn.Linear(d, h, bias=spec.bias) for _ in range(B))
        if spec.near_miss == "shared_linear" and B > 1:
            self.fc1[1] = self.fc1[0]
        self.fc2 = nn.ModuleList(nn.Linear(h, d, bias=spec.bias) for _ in range(B))
        acts = [ACTIVATIONS[spec.activation]() for _ in range(B)]
        if spec.near_miss == "activation" and B > 1:
            acts[-1] = nn.ReLU() if spec.activation != "relu" else nn.GELU()
        self.acts = nn.ModuleList(acts)
        self.gammas = nn.ParameterList(nn.Parameter(torch.empty(d))
                                       for _ in range(B if spec.layerscale else 0))
        self.register_buffer("lam", torch.tensor(spec.lam if spec.lam is not None else 0.0))
        randomize(self, g)
        self.to(spec.dtype).eval()

    def _norm(self, x, i):
        if self.spec.norm == "none":
            return x
        m = self.norms[i if self.spec.norm == "per_branch" else 0]
        if self.spec.functional_norm:
            return F.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)
        return m(x)

    def forward(self, x):
        spec = self.spec
        inputs = [x] * spec.branches
        if spec.near_miss == "input" and spec.branches > 1:
            inputs[-1] = x * 2.0
        z = [fc1(self._norm(xi, i)) for i, (fc1, xi) in enumerate(zip(self.fc1, inputs))]
        if spec.lam is not None:
            mean = sum(z) / len(z)
            pre = [(1 - self.lam) * zi + self.lam * mean for zi in z]
        else:
            pre = z
        outs = [fc2(act(p)) for fc2, act, p in zip(self.fc2, self.acts, pre)]
        if spec.layerscale:
            outs = [o * g for o, g in zip(outs, self.gammas)]
        total = sum(outs)
        if spec.average:
            total = total / len(outs)
        if spec.near_miss == "leak" and spec.branches > 1:
            return x + total, z[0]
        return x + total


def randomize(module: nn.Module, g: torch.Generator) -> None:
    """Random weights of O(1/sqrt(fan_in)), LayerNorm affines and LayerScales far from 1/0 (so folding them is
    actually tested: default-initialized norms fold trivially)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if name.endswith("weight") else 0.0))


def make_inputs(dim: int, dtype: torch.dtype, seed: int = 0, batch: int = 2, tokens: int = 5) -> tuple:
    g = torch.Generator().manual_seed(seed + 1)
    return (torch.randn(batch, tokens, dim, generator=g).to(dtype),)


ATTENTION_FORMS = ("timm_sdpa", "timm_explicit", "separate_sdpa", "separate_softmax_scale_before",
                   "separate_softmax_scale_after", "softmax_module", "einsum")
ATTENTION_NEAR_MISSES = ("mask", "causal", "qk_norm", "input", "read_outside")


@dataclass
class AttentionSpec:
    """What ``GeneratedAttentionBlock`` builds: B attention branches on one input, summed into the residual.

    ``lam=None`` sums independent branches; otherwise branches are joined at the softmax input with ``lam``
    (then every branch uses the explicit softmax form, since SDPA hides the logits).
    """

    dim: int = 8
    heads: int = 2
    head_dim: int = 4
    branches: int = 2
    form: str = "timm_sdpa"
    bias: bool = True
    norm: str = "per_branch"   # per_branch | shared
    layerscale: bool = True
    lam: float | None = None
    mask: bool = False         # every branch adds one shared per-head (1, heads, N, N) mask
    dtype: torch.dtype = torch.float32
    projection: bool = True    # False: no output projection (vit-pytorch's to_out = nn.Identity()), the
    #                            heads' width is dim and the form is not timm's (timm's Attention has one)
    near_miss: str | None = None   # mask: a mask per branch; causal: only the last branch is causal;
    #                                read_outside: the first branch's output is also read outside the sum
    seed: int = 0

    def expect(self) -> dict:
        """SDPA calls and heads per call after fuse (None: not asserted)."""
        B, H = self.branches, self.heads
        if self.near_miss is not None and B > 1:
            return {"sdpa": None, "heads": None}
        if self.lam is not None and 0.0 < self.lam < 1.0 and B > 1:
            return {"sdpa": 0, "heads": None}  # left as is: see lift_attention's cost check
        joined = self.lam == 1.0 or B == 1
        return {"sdpa": 1, "heads": H if joined else H * B}


class _Branch(nn.Module):
    def __init__(self, spec: AttentionSpec, index: int):
        super().__init__()
        d, inner = spec.dim, spec.heads * spec.head_dim
        self.spec = spec
        self.causal = spec.near_miss == "causal" and index == spec.branches - 1
        if spec.form.startswith("timm"):
            from timm.layers import Attention

            self.attn = Attention(d, spec.heads, attn_head_dim=spec.head_dim, qkv_bias=spec.bias,
                                  qk_norm=spec.near_miss == "qk_norm", norm_layer=nn.LayerNorm)
            self.attn.fused_attn = spec.form == "timm_sdpa"
        else:
            self.q, self.k, self.v = (nn.Linear(d, inner, bias=spec.bias) for _ in range(3))
            self.o = nn.Linear(inner, d, bias=spec.bias)
            self.softmax = nn.Softmax(dim=-1)
        self.gamma = nn.Parameter(torch.empty(d)) if spec.layerscale else None

    def qkv(self, x):
        """(q, k, v) of shape (batch, heads, tokens, head_dim)."""
        B_, N, _ = x.shape
        s = self.spec
        if s.form.startswith("timm"):
            q, k, v = timm_qkv(self.attn, x)
            return self.attn.q_norm(q), self.attn.k_norm(k), v
        return tuple(lin(x).view(B_, -1, s.heads, s.head_dim).permute(0, 2, 1, 3)
                     for lin in (self.q, self.k, self.v))

    def logits(self, q, k):
        s = self.spec
        scale = s.head_dim ** -0.5
        if s.form == "separate_softmax_scale_after":
            return (q @ k.transpose(-2, -1)) * scale
        if s.form == "einsum":
            return torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
        return (q * scale) @ k.transpose(-2, -1)

    def finish(self, probs, v, x):
        o = torch.einsum("bhqk,bhkd->bhqd", probs, v) if self.spec.form == "einsum" else probs @ v
        o = o.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return self.project(o)

    def project(self, o):
        if not self.spec.projection:  # vit-pytorch's to_out = nn.Identity() (heads x head_dim = dim)
            out = o
        else:
            out = self.attn.proj(o) if self.spec.form.startswith("timm") else self.o(o)
        return out * self.gamma if self.gamma is not None else out

    def forward(self, x, mask):
        """This branch's attention of ``x``, adding ``mask`` (None: no mask) to its logits."""
        s = self.spec
        if s.form == "timm_sdpa" and not self.causal:
            out = self.attn(x, attn_mask=mask) if mask is not None else self.attn(x)
            return out * self.gamma if self.gamma is not None else out
        if s.form.startswith("timm"):
            if mask is not None:
                return self.project(explicit_timm_attention(self.attn, x, mask))
            out = self.attn(x, is_causal=True) if self.causal else self.attn(x)
            return out * self.gamma if self.gamma is not None else out
        q, k, v = self.qkv(x)
        if s.form == "separate_sdpa" or self.causal:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal)
            return self.project(o.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))
        logits = self.logits(q, k)
        if mask is not None:
            logits = logits + mask
        probs = self.softmax(logits) if s.form == "softmax_module" else logits.softmax(dim=-1)
        return self.finish(probs, v, x)


def timm_qkv(attn, x):
    """q, k, v of a timm ``Attention`` as timm computes them: one qkv Linear, reshape, permute, unbind."""
    B_, N, _ = x.shape
    return attn.qkv(x).reshape(B_, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)


def explicit_timm_attention(attn, x, mask):
    """timm's attention with an explicit softmax and an additive ``mask``, before the output projection."""
    q, k, v = timm_qkv(attn, x)
    q, k = attn.q_norm(q), attn.k_norm(k)
    a = ((q * attn.scale) @ k.transpose(-2, -1) + mask).softmax(dim=-1)
    return (a @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)


class GeneratedAttentionBlock(nn.Module):
    """``x + sum_i ls_i * attn_i(norm_i(x))``, optionally joined at the softmax input with ``lam``."""

    def __init__(self, spec: AttentionSpec):
        super().__init__()
        self.spec = spec
        g = torch.Generator().manual_seed(spec.seed)
        n_norms = spec.branches if spec.norm == "per_branch" else 1
        self.norms = nn.ModuleList(nn.LayerNorm(spec.dim) for _ in range(n_norms))
        self.branches = nn.ModuleList(_Branch(spec, i) for i in range(spec.branches))
        self.register_buffer("lam", torch.tensor(spec.lam if spec.lam is not None else 0.0))
        self.register_buffer("mask", torch.randn(1, spec.heads, 5, 5, generator=g))
        self.register_buffer("masks", torch.randn(spec.branches, 1, 1, 5, 5, generator=g))
        randomize(self, g)
        self.to(spec.dtype).eval()

    def forward(self, x):
        s = self.spec
        xs = [self.norms[i if s.norm == "per_branch" else 0](x) for i in range(s.branches)]
        if s.near_miss == "input" and s.branches > 1:
            xs[-1] = xs[-1] * 2.0
        masks = [self.masks[i] for i in range(s.branches)] if s.near_miss == "mask" else \
            [self.mask] * s.branches if s.mask else [None] * s.branches
        if s.lam is None:
            return self.residual(x, [b(xi, m) for b, xi, m in zip(self.branches, xs, masks)])
        qkv = [b.qkv(xi) for b, xi in zip(self.branches, xs)]
        logits = [b.logits(q, k) for b, (q, k, _) in zip(self.branches, qkv)]
        logits = [lg if m is None else lg + m for lg, m in zip(logits, masks)]
        mean = sum(logits) / len(logits)
        outs = []
        for b, lg, (_, _, v), xi in zip(self.branches, logits, qkv, xs):
            probs = ((1 - self.lam) * lg + self.lam * mean).softmax(dim=-1)
            outs.append(b.finish(probs, v, xi))
        return self.residual(x, outs)

    def residual(self, x, outs):
        out = x + sum(outs)
        if self.spec.near_miss == "read_outside" and self.spec.branches > 1:
            out = out + outs[0].tanh()  # the first branch is read by a nonlinear op besides the sum
        return out
