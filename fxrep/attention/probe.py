"""Reading an attention's head layout by running its view chains on coded tensors.

A probe tensor's values encode (batch, token, feature), so after the view chain runs, the head/feature
layout is read off the result instead of being inferred from reshape literals; shape arithmetic
(``x.shape``, ``size()``) is evaluated on a tensor of the input's shape. ``verify`` evaluates the original
subgraph and the lifted op in float64 on one random input.
"""

from __future__ import annotations

import torch
from torch import fx

from .. import algebra
from ..ir import as_layer_norm
from ..ir.effects import is_view
from ..ir.evaluate import evaluate, load_attribute
from ..ir.readers import is_shape_read, scale_op
from ..ir.targets import SHAPE_ARITHMETIC, SHAPE_METHODS
from ..ops import reference_attention
from .recognize import Chain, NotAttention, describe

f64 = algebra.f64


class ProbeFailed(NotAttention):
    """Evaluating the subgraph on a probe raised: the code does not accept a tensor of the probe's shape."""


class ShapeMismatch(NotAttention):
    """The subgraph evaluated on a probe returns a tensor of another shape than the lifted op."""


class LayoutMismatch(NotAttention):
    """A view chain does not keep the batch and token axes apart as the input's layout was assumed to be (the
    lift tries the other layout: tokens first, as ``nn.MultiheadAttention`` computes)."""


class Probe:
    """Evaluates small parts of the graph on probe tensors (shape arithmetic included)."""

    def __init__(self, x: fx.Node, x_value: torch.Tensor, order: dict, constants: dict):
        self.env, self.order = {}, order
        self.constants = constants  # get_attr node -> float64 value, shared by the probes of one analysis
        # tensors whose *shape* equals x's: x and the inputs of LayerNorms that produced it
        self.shape_sources = {}
        n = x
        while n is not None:
            self.shape_sources[n] = x_value
            ln = as_layer_norm(n)
            n = ln.input if ln is not None else None

    def load(self, a: fx.Node):
        """The value of a ``get_attr`` node, float64 for floating tensors (shared by the probes of one
        analysis)."""
        return self._load(a, {})

    def _load(self, a, env):
        if a in env:
            return env[a]
        if a.op == "get_attr":
            if a not in self.constants:
                t = load_attribute(a)
                floating = isinstance(t, torch.Tensor) and t.is_floating_point()
                self.constants[a] = t.detach().to(f64) if floating else t
            return self.constants[a]
        if a in self.shape_sources:
            return self.shape_sources[a]
        if (a.op == "call_function" and a.target in SHAPE_ARITHMETIC) or \
                (a.op == "call_method" and a.target in SHAPE_METHODS):
            value = evaluate(a, lambda b: self._load_shape_source(a, b, env))
            if isinstance(value, torch.Tensor):
                raise NotAttention(f"{describe(a)} reads a tensor outside the attention")
            return value
        raise NotAttention(f"{describe(a)} is needed to evaluate the attention but is not part of it")

    def _load_shape_source(self, reader: fx.Node, a, env):
        """An argument of shape arithmetic: a tensor outside the attention whose shape alone is read (an
        exported graph sizes its reshapes with ``sym_size`` of the model's input) stands in as a meta-device
        tensor of its recorded shape, which has no values to read."""
        meta = a.meta.get("tensor_meta") if isinstance(a, fx.Node) else None
        if is_shape_read(reader) and a is reader.args[0] and meta is not None and a not in env \
                and a not in self.shape_sources:
            return torch.empty(meta.shape, device="meta")
        return self._load(a, env)

    def run(self, nodes, env, passthrough=(), overrides=None):
        """Evaluate ``nodes`` (any order) given ``env``; nodes in ``passthrough`` copy their data input, nodes
        in ``overrides`` are computed by ``overrides[node](env)``."""
        env = dict(env)
        overrides = overrides or {}
        for n in sorted(nodes, key=self.order.__getitem__):
            if n in env:
                continue
            if n in passthrough:
                env[n] = env[scale_op(n)[0]]
                continue
            if n in overrides:
                env[n] = overrides[n](env)
                continue
            try:
                env[n] = evaluate(n, lambda a: self._load(a, env))
            except NotAttention:
                raise
            except Exception as e:  # noqa: BLE001 - any failure means the layout is not what we expect
                raise ProbeFailed(f"evaluating {describe(n)} on a probe failed "
                                  f"({type(e).__name__}: {e})") from e
        return env


def _coded(shape) -> torch.Tensor:
    return torch.arange(int(torch.tensor(shape).prod()), dtype=f64).reshape(shape)


def _lead_rows(lead: tuple, trailing: int) -> torch.Tensor:
    """The flat index of every leading (batch) position, shaped to broadcast against ``lead + trailing``
    axes."""
    return torch.arange(int(torch.tensor(lead).prod())).reshape(lead + (1,) * trailing)


def logical_shape(x_value, tokens_first: bool) -> tuple[tuple, int]:
    """(batch axes, token count) of the attention's input: (*lead, N, d), or (N, B, d) tokens first."""
    if tokens_first:
        return (x_value.shape[1],), x_value.shape[0]
    return tuple(x_value.shape[:-2]), x_value.shape[-2]


def unfold_heads(t, lead: tuple):
    """(B, H, ...) from (B*H, ...) for one batch axis (batch-major, as ``view(N, B*H, d).transpose(0, 1)``
    folds them); ``t`` as it is otherwise. A wrong guess is caught by the code checks that follow."""
    if isinstance(t, torch.Tensor) and len(lead) == 1 and t.dim() == 3 and t.shape[0] % lead[0] == 0:
        return t.unflatten(0, (lead[0], t.shape[0] // lead[0]))
    return t


def decode_heads(chain: Chain, probe: Probe, x_value, transposed: bool,
                 tokens_first: bool = False) -> torch.Tensor:
    """Run the chain on a coded Linear output; return the (H, d) map of head rows into the Linear's rows.

    The Linear's input is ``x_value`` of shape (*lead, N, d) (or (N, B, d) ``tokens_first``): every leading
    axis must stay a batch axis, so the chain must end in (*lead, H, N, dh) (or (*lead, H, dh, N) when
    ``transposed``), or with one batch axis in (B*H, N, dh): heads folded into the batch, as
    ``nn.MultiheadAttention`` computes its attention weights with ``bmm``."""
    lin = chain.linear
    lead, N = logical_shape(x_value, tokens_first)
    F_ = lin.out_features
    y = _coded(lead + (N, F_))
    y = y.transpose(0, 1) if tokens_first else y  # the codes still say (batch, token, feature)
    env = probe.run(chain.nodes, {lin.node: y, lin.input: x_value}, passthrough=chain.scale_nodes)
    t = unfold_heads(env[chain.end] if chain.nodes else y, lead)
    if not isinstance(t, torch.Tensor) or t.dim() != len(lead) + 3:
        fewer = isinstance(t, torch.Tensor) and t.dim() < len(lead) + 3
        folded = ": it folds input axes together" if fewer else ""
        raise LayoutMismatch(f"{describe(chain.end)} is not a (batch, heads, tokens, dim) tensor for an "
                           f"input of shape {tuple(x_value.shape)}{folded}")
    t = t.transpose(-2, -1) if transposed else t
    if tuple(t.shape[:len(lead)]) != lead or t.shape[-2] != N:
        raise LayoutMismatch(f"{describe(chain.end)} does not keep the batch and token axes of an input of "
                           f"shape {tuple(x_value.shape)} apart")
    t = t.long()
    row, n, f = t // (F_ * N), (t // F_) % N, t % F_
    head_map = f[(0,) * len(lead)][:, :1, :]
    ok = ((row == _lead_rows(lead, 3)).all() and (n == torch.arange(N).view(N, 1)).all()
          and (f == head_map).all())
    if not ok:
        raise LayoutMismatch(f"{describe(chain.end)} mixes tokens or batch elements into heads")
    head_map = head_map[:, 0, :]
    if head_map.unique().numel() != head_map.numel():
        raise NotAttention(f"{describe(chain.end)} repeats features across heads")
    return head_map


def output_chain(anchor: fx.Node, probe: Probe, x_value, H: int, dv: int, tokens_first: bool = False,
                 folded: bool = False, out_tokens_first: bool | None = None):
    """Follow the attention output through views to the (*lead, tokens, H*dv) tensor (or (tokens, batch,
    H*dv) ``out_tokens_first``, by default as the input ``tokens_first``); return it, the view nodes and its
    column -> (head, feature) maps. ``folded``: the attention output is (B*H, N, dv), heads folded into the
    batch."""
    out_tokens_first = tokens_first if out_tokens_first is None else out_tokens_first
    nodes, n = [], anchor
    while True:  # a view read only by the next view (and by shape reads that build its shape)
        readers = [u for u in n.users if not is_shape_read(u)]
        if len(readers) != 1 or not is_view(readers[0]):
            break
        n = readers[0]
        nodes.append(n)
    lead, N = logical_shape(x_value, tokens_first)
    o = _coded(lead + (H, N, dv))
    env = probe.run(nodes, {anchor: o.flatten(0, 1) if folded else o})
    z = env[n]
    if out_tokens_first and isinstance(z, torch.Tensor) and z.dim() == 3:
        z = z.transpose(0, 1)
    if not isinstance(z, torch.Tensor) or tuple(z.shape) != lead + (N, H * dv):
        order = "tokens, batch" if out_tokens_first else "batch, tokens"
        raise LayoutMismatch(f"the attention output {describe(n)} is not merged back to ({order}, "
                             f"heads*dim)")
    z = z.long()
    j, tok, h, row = z % dv, (z // dv) % N, (z // (dv * N)) % H, z // (dv * N * H)
    first = (0,) * len(lead) + (0,)
    if not ((row == _lead_rows(lead, 2)).all() and (tok == torch.arange(N).view(N, 1)).all()
            and (h == h[first]).all() and (j == j[first]).all()):
        raise LayoutMismatch(f"{describe(n)} mixes tokens or batch elements")
    return n, nodes, h[first], j[first]


def verify(probe, x, nodes, z, params, H, shape, verified: dict, stand_ins=None, causal: bool = False,
           overrides=None, tokens_first: bool = False, out_tokens_first: bool | None = None) -> None:
    """Evaluate the original subgraph and the lifted op in float64 on one random input; they must agree.
    ``verified`` keeps the values computed on that input per (x, shape), so branches that share nodes (the
    joined logits read every branch's q/k) evaluate them once. ``stand_ins`` replace run-time inputs of the
    subgraph (a mask by "no mask", an ``is_causal`` input by False): what the lifted op passes through
    unchanged is not part of what is verified; ``causal`` makes the reference causal."""
    key = (x, shape)
    if key not in verified:
        gen = torch.Generator().manual_seed(1234)
        x_value = torch.randn(shape, dtype=f64, generator=gen)
        verified[key] = {x: x_value}
    env = verified[key]
    for node, value in (stand_ins or {}).items():
        env.setdefault(node, value)
    x_value = env[x]
    probe.shape_sources = {k: x_value for k in probe.shape_sources}
    env.update(probe.run(nodes - env.keys(), env, overrides=overrides))
    expected = env[z]
    projections = verified.setdefault(("projections", tokens_first) + key, {})

    def project(x, w, b):  # joined branches share q/k weights: project x with them once
        if (id(w), id(b)) not in projections:
            projections[id(w), id(b)] = (w, b, torch.nn.functional.linear(x, w, b))
        return projections[id(w), id(b)][2]

    # the op reads (tokens, batch, d) where ``tokens_first`` and its output is read so where
    # ``out_tokens_first`` (by default, as its input)
    out_tokens_first = tokens_first if out_tokens_first is None else out_tokens_first
    actual = reference_attention(x_value.transpose(0, 1) if tokens_first else x_value, params, H, project,
                                 causal)
    actual = actual.transpose(0, 1) if out_tokens_first else actual
    if not isinstance(expected, torch.Tensor) or expected.shape != actual.shape:
        raise ShapeMismatch(f"recognized attention did not verify numerically (its output has shape "
                           f"{tuple(getattr(expected, 'shape', ()))}, the lifted op's {tuple(actual.shape)})")
    err = (expected - actual).abs().max().item() / max(expected.abs().max().item(), 1e-30)
    if not err <= 1e-9:
        raise NotAttention(f"recognized attention did not verify numerically (rel. error {err:.2g})")
