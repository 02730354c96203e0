"""Tools for proving a fused model equivalent: the assertion and hypothesis strategies fxrep's own tests use.

    from fxrep.testing import assert_fused_equivalent, branched_mlp_blocks
    @given(branched_mlp_blocks())
    def test_my_model(case): assert_fused_equivalent(case.model, case.inputs)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .engine import fuse
from .equivalence import DEFAULT_RTOL, assert_equivalent, check_inputs, compare_outputs, relative_error
from .errors import EquivalenceError
from .snapshot import ModelSnapshot

__all__ = [
    "assert_fused_equivalent", "compare_outputs", "relative_error", "DEFAULT_RTOL", "graph_code", "Case",
    "branched_mlp_blocks", "branched_attention_blocks", "mlp_specs", "attention_specs", "random_graphs",
    "fuzz_check", "make_inputs",
]


def assert_fused_equivalent(model: nn.Module, inputs, *, fused=None, rtol: float | None = None,
                            patterns=None, check_unchanged: bool = True) -> torch.fx.GraphModule:
    """Fuse ``model`` (unless ``fused`` is given), run both on ``inputs`` and raise EquivalenceError when
    max |y - y_fused| / max |y| exceeds ``rtol`` (default by dtype: float32 1e-5, float64 1e-10, fp16 1e-2,
    bf16 2e-2). Also checks that fusing left ``model``'s parameters, buffers and every attribute of every
    module (caches and other containers included) untouched. Returns the fused GraphModule."""
    inputs = check_inputs(inputs)
    snapshot = ModelSnapshot(model) if check_unchanged else None
    if fused is None:
        fused = fuse(model, patterns=patterns, example_inputs=inputs)
    assert_equivalent(model, fused, inputs, rtol=rtol, snapshot=snapshot)
    return fused


def graph_code(model) -> str:
    """The code of a GraphModule, or of a module's trace; used to assert a graph was left alone."""
    return model.code if isinstance(model, torch.fx.GraphModule) else torch.fx.symbolic_trace(model).code


@dataclass
class Case:
    """One generated example: a model in eval mode and inputs for it, plus what the generator intended."""

    model: nn.Module
    inputs: tuple
    info: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Case({self.info})"




# ----------------------------------------------------------------------------------------------------------
# Generated branched blocks. Each block is a plain nn.Module written the way a user would write it; the spec
# it was built from says what fuse should do with it (``expect``), so tests can assert structure too.
# ----------------------------------------------------------------------------------------------------------

try:
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a dev dependency
    st = None

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
                # 0 < lam < 1 mixes every branch's pre-activation with the odd one out: nothing shares an input
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
        self.gammas = nn.ParameterList(nn.Parameter(torch.empty(d)) for _ in range(B if spec.layerscale else 0))
        self.register_buffer("lam", torch.tensor(spec.lam if spec.lam is not None else 0.0))
        _randomize(self, g)
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


def _randomize(module: nn.Module, g: torch.Generator) -> None:
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


def _lam_values():
    return st.one_of(st.just(1.0), st.just(0.0), st.none(), st.floats(0.05, 0.95))


def mlp_specs(branches=None, near_miss: bool | None = False, dtypes=(torch.float32, torch.float64)):
    """Hypothesis strategy of MlpSpec: 1-6 branches, widths, bias, norm placement and form, LayerScale,
    activations, dtypes, lam (1, 0, None for a plain sum, or in (0, 1)); with ``near_miss=True`` one of
    MLP_NEAR_MISSES (different eps / activation / input, an intermediate read outside, a shared Linear)."""
    misses = st.sampled_from(MLP_NEAR_MISSES) if near_miss else st.none()
    if near_miss is None:
        misses = st.one_of(st.none(), st.sampled_from(MLP_NEAR_MISSES))
    return st.builds(
        MlpSpec,
        dim=st.integers(2, 24), hidden=st.integers(1, 40),
        branches=branches if branches is not None else st.integers(1 if not near_miss else 2, 6),
        bias=st.booleans(), norm=st.sampled_from(["per_branch", "shared", "none"]),
        functional_norm=st.booleans(), layerscale=st.booleans(), activation=st.sampled_from(sorted(ACTIVATIONS)),
        lam=_lam_values(), average=st.booleans(), dtype=st.sampled_from(dtypes), near_miss=misses,
        seed=st.integers(0, 2**16),
    )


@st.composite if st is not None else (lambda f: f)
def branched_mlp_blocks(draw, **kwargs) -> Case:
    """A ``Case`` with a GeneratedMlpBlock built from ``mlp_specs(**kwargs)`` and inputs for it."""
    spec = draw(mlp_specs(**kwargs))
    if spec.near_miss == "eps" and spec.norm != "per_branch":
        spec.norm = "per_branch"
    model = GeneratedMlpBlock(spec)
    return Case(model, make_inputs(spec.dim, spec.dtype, spec.seed), {"spec": spec})


ATTENTION_FORMS = ("timm_sdpa", "timm_explicit", "separate_sdpa", "separate_softmax_scale_before",
                   "separate_softmax_scale_after", "softmax_module", "einsum")
ATTENTION_NEAR_MISSES = ("mask", "causal", "qk_norm", "input")


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
    dtype: torch.dtype = torch.float32
    near_miss: str | None = None
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
    def __init__(self, spec: AttentionSpec):
        super().__init__()
        d, inner = spec.dim, spec.heads * spec.head_dim
        self.spec = spec
        if spec.form.startswith("timm"):
            from timm.layers import Attention

            self.attn = Attention(d, spec.heads, attn_head_dim=spec.head_dim, qkv_bias=spec.bias,
                                  qk_norm=spec.near_miss == "qk_norm", norm_layer=nn.LayerNorm)
            self.attn.fused_attn = spec.form == "timm_sdpa" and spec.near_miss != "mask"
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
            qkv = self.attn.qkv(x).reshape(B_, N, 3, s.heads, s.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            return self.attn.q_norm(q), self.attn.k_norm(k), v
        return tuple(lin(x).view(B_, -1, s.heads, s.head_dim).permute(0, 2, 1, 3) for lin in (self.q, self.k, self.v))

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
        out = self.attn.proj(o) if self.spec.form.startswith("timm") else self.o(o)
        return out * self.gamma if self.gamma is not None else out

    def forward(self, x, mask):
        s = self.spec
        if s.form.startswith("timm"):
            if s.near_miss == "mask":
                return self.project(_explicit_timm(self.attn, x, mask))
            out = self.attn(x, is_causal=s.near_miss == "causal") if s.near_miss == "causal" else self.attn(x)
            return out * self.gamma if self.gamma is not None else out
        q, k, v = self.qkv(x)
        if s.form == "separate_sdpa" or s.near_miss == "causal":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask if s.near_miss == "mask" else None,
                                               is_causal=s.near_miss == "causal")
            return self.project(o.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))
        logits = self.logits(q, k)
        if s.near_miss == "mask":
            logits = logits + mask
        probs = self.softmax(logits) if s.form == "softmax_module" else logits.softmax(dim=-1)
        return self.finish(probs, v, x)


def _explicit_timm(attn, x, mask):
    B_, N, _ = x.shape
    q, k, v = attn.qkv(x).reshape(B_, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    a = ((q * attn.scale) @ k.transpose(-2, -1) + mask).softmax(dim=-1)
    return (a @ v).transpose(1, 2).reshape(B_, N, -1)


class GeneratedAttentionBlock(nn.Module):
    """``x + sum_i ls_i * attn_i(norm_i(x))``, optionally joined at the softmax input with ``lam``."""

    def __init__(self, spec: AttentionSpec):
        super().__init__()
        self.spec = spec
        g = torch.Generator().manual_seed(spec.seed)
        n_norms = spec.branches if spec.norm == "per_branch" else 1
        self.norms = nn.ModuleList(nn.LayerNorm(spec.dim) for _ in range(n_norms))
        self.branches = nn.ModuleList(_Branch(spec) for _ in range(spec.branches))
        self.register_buffer("lam", torch.tensor(spec.lam if spec.lam is not None else 0.0))
        self.register_buffer("mask", torch.randn(1, 1, 1, 5, generator=g))
        _randomize(self, g)
        self.to(spec.dtype).eval()

    def forward(self, x):
        s = self.spec
        xs = [self.norms[i if s.norm == "per_branch" else 0](x) for i in range(s.branches)]
        if s.near_miss == "input" and s.branches > 1:
            xs[-1] = xs[-1] * 2.0
        if s.lam is None:
            return x + sum(b(xi, self.mask) for b, xi in zip(self.branches, xs))
        qkv = [b.qkv(xi) for b, xi in zip(self.branches, xs)]
        logits = [b.logits(q, k) for b, (q, k, _) in zip(self.branches, qkv)]
        if s.near_miss == "mask":
            logits = [lg + self.mask for lg in logits]
        mean = sum(logits) / len(logits)
        outs = []
        for b, lg, (_, _, v), xi in zip(self.branches, logits, qkv, xs):
            probs = ((1 - self.lam) * lg + self.lam * mean).softmax(dim=-1)
            outs.append(b.finish(probs, v, xi))
        return x + sum(outs)


def attention_specs(branches=None, near_miss: bool | None = False, dtypes=(torch.float32, torch.float64)):
    """Hypothesis strategy of AttentionSpec over heads, head dims, branches 1-6, all ATTENTION_FORMS, bias,
    norm placement, LayerScale, lam, dtypes; ``near_miss=True`` draws one of ATTENTION_NEAR_MISSES."""
    misses = st.sampled_from(ATTENTION_NEAR_MISSES) if near_miss else st.none()
    return st.builds(
        AttentionSpec,
        dim=st.integers(2, 16), heads=st.integers(1, 4), head_dim=st.integers(1, 8),
        branches=branches if branches is not None else st.integers(1 if not near_miss else 2, 6),
        form=st.sampled_from(ATTENTION_FORMS), bias=st.booleans(), norm=st.sampled_from(["per_branch", "shared"]),
        layerscale=st.booleans(), lam=_lam_values(), dtype=st.sampled_from(dtypes), near_miss=misses,
        seed=st.integers(0, 2**16),
    )


@st.composite if st is not None else (lambda f: f)
def branched_attention_blocks(draw, **kwargs) -> Case:
    """A ``Case`` with a GeneratedAttentionBlock built from ``attention_specs(**kwargs)`` (5 tokens)."""
    spec = draw(attention_specs(**kwargs))
    if spec.near_miss == "causal" and spec.lam is not None:
        spec.lam = None  # causal joins have no explicit-softmax spelling here
    if spec.near_miss == "qk_norm" and not spec.form.startswith("timm"):
        spec.form = "timm_sdpa"
    model = GeneratedAttentionBlock(spec)
    return Case(model, make_inputs(spec.dim, spec.dtype, spec.seed), {"spec": spec})


# ----------------------------------------------------------------------------------------------------------
# Random, mostly non-conforming graphs for differential fuzzing: fuse must raise a documented FxrepError or
# return a model that computes the same function, and must leave the input model unchanged.
# ----------------------------------------------------------------------------------------------------------

FUZZ_OPS = ("linear", "shared_linear", "layer_norm", "functional_norm", "activation", "add", "scale_const",
            "scale_param", "mlp", "attention", "masked_attention", "reshape", "shuffle_view", "as_strided",
            "inplace", "inplace_act", "cached")


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
            elif op in ("layer_norm", "functional_norm"):
                self.mods.append(nn.LayerNorm(d, eps=(1e-5, 1e-6)[opt % 2]))
                idx = len(self.mods) - 1
            elif op == "mlp":
                h = 2 + opt % 7
                self.mods.append(nn.Sequential(nn.Linear(d, h), ACTIVATIONS[sorted(ACTIVATIONS)[opt % 4]](),
                                               nn.Linear(h, d)))
                idx = len(self.mods) - 1
            elif op in ("attention", "masked_attention"):
                from timm.layers import Attention

                heads = (1, 2)[opt % 2] if d % 2 == 0 else 1
                self.mods.append(Attention(d, heads, qkv_bias=opt % 3 != 0))
                self.mods[-1].fused_attn = opt % 4 < 2
                idx = len(self.mods) - 1
            elif op == "scale_param":
                self.params.append(nn.Parameter(torch.empty(d)))
                idx = len(self.params) - 1
            elif op == "inplace_act":
                self.mods.append(nn.Sequential(nn.Linear(d, d), (nn.ReLU, nn.SiLU, nn.Hardswish)[opt % 3](inplace=True)))
                idx = len(self.mods) - 1
            elif op == "cached":
                self.mods.append(CachedShift(d))
                idx = len(self.mods) - 1
            self.index.append(idx)
        self.register_buffer("mask", torch.randn(1, 1, 1, 1))
        _randomize(self, torch.Generator().manual_seed(spec.seed))
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
                attn = self.mods[idx]
                B_, N, C = a.shape
                q, k, v = attn.qkv(a).reshape(B_, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
                w = ((q * attn.scale) @ k.transpose(-2, -1) + self.mask).softmax(dim=-1)
                y = attn.proj((w @ v).transpose(1, 2).reshape(B_, N, C))
            elif op == "shuffle_view":  # ShuffleNet's channel shuffle / Swin's windows: a view after contiguous
                t = a.unflatten(-1, (2, -1)).transpose(-1, -2).contiguous()
                y = t.view(a.shape) if opt % 2 else t.reshape(a.shape)
            elif op == "as_strided":  # reads the memory layout of a contiguous copy
                t = a.transpose(-1, -2).contiguous()
                y = t.as_strided(a.shape, (a.shape[1] * a.shape[2], a.shape[2], 1))
            elif op == "inplace":  # a value read before and after a write into it (or into a view of it)
                before = a * 1.0 if opt % 2 else a + 0.0
                target = before.transpose(-1, -2) if opt % 3 == 0 else before
                target.mul_(0.5 + opt % 2) if opt % 4 < 2 else target.add_(b.transpose(-1, -2) if opt % 3 == 0 else b)
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


@st.composite if st is not None else (lambda f: f)
def random_graphs(draw, max_steps: int = 10, dtypes=(torch.float32, torch.float64, torch.bfloat16)) -> Case:
    """A ``Case`` with a RandomGraphModel: DAGs of Linear (some shared), LayerNorm (module and functional,
    mixed eps), activations, adds, constant and parameter scales, MLPs, timm attention (SDPA or explicit),
    masked attention and reshapes; layout readers after contiguous (view, as_strided), in-place writes into
    values read elsewhere, in-place activation modules and a module that caches values while it runs; values
    with several users; float32/float64/bfloat16."""
    n = draw(st.integers(1, max_steps))
    steps = []
    for i in range(n):
        op = draw(st.sampled_from(FUZZ_OPS))
        steps.append((op, (draw(st.integers(0, i)), draw(st.integers(0, i))), draw(st.integers(0, 11))))
    spec = GraphSpec(dim=draw(st.sampled_from([2, 4, 6, 8])), steps=steps,
                     outputs=draw(st.lists(st.integers(0, n), max_size=3)), tuple_output=draw(st.booleans()),
                     dtype=draw(st.sampled_from(dtypes)), seed=draw(st.integers(0, 2**16)))
    model = RandomGraphModel(spec)
    return Case(model, make_inputs(spec.dim, spec.dtype, spec.seed, tokens=3), {"spec": spec})


def fuzz_check(case: Case) -> dict:
    """Fuse ``case.model``: either a documented FxrepError, or the same outputs and an unchanged input model.
    Returns {'applied': number of rewrites, 'error': str | None}; raises EquivalenceError on a wrong result."""
    from .errors import FxrepError

    try:
        fused = assert_fused_equivalent(case.model, case.inputs,
                                        rtol=5e-2 if case.info["spec"].dtype == torch.bfloat16 else None)
    except EquivalenceError:
        raise
    except FxrepError as e:
        return {"applied": 0, "error": f"{type(e).__name__}: {e}"}
    return {"applied": len(fused.meta["fxrep_report"].applied), "error": None}
