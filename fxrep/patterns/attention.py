"""``lift_attention``: recognize attention in any common traced form and lift it to one canonical op.

Recognized (after ``symbolic_trace``), in any mix:

- ``F.scaled_dot_product_attention(q, k, v)`` (timm's fused path, explicit ``scale=`` or the default);
- ``softmax(s * (q @ k.transpose(-2, -1)), dim=-1) @ v`` with the scale before or after the matmul, softmax as
  function, method or module, and softmax inputs that are *sums of scaled logit products*: the joined
  branches of the math doc section 3, ``(1 - lam) * S_i + lam * mean_j S_j``;
- the same with ``torch.einsum('bhqd,bhkd->bhqk', q, k)`` / ``einsum('bhqk,bhkd->bhqd', p, v)``;
- q, k, v produced by one fused qkv Linear (reshape/permute/unbind, timm) or separate Linears (view/permute,
  Hugging Face), heads merged back by transpose/reshape (any head and feature order).

How: q, k and v are followed back through view ops to a Linear. The view chain is *probed*: it is run on a
tensor whose values encode (batch, token, feature), so the head/feature layout is read off the result
instead of being inferred from reshape literals. Each lift is then *verified*: the original subgraph and
the lifted op are evaluated in float64 on a random input and must agree to 1e-9. Anything else (a mask,
causal attention, active attention dropout, q/k norms that are not the identity, intermediate values read
elsewhere, cross-attention) is reported as skipped and left untouched.

The lifted op is ``fxrep.ops.multi_head_attention`` with every scale and joining coefficient folded into
the q weights. Joined logits ``sum_t c_t Q_t K_t^T`` become one head of query/key width ``sum_t d_t``.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from ..ir import (
    ADD_TARGETS,
    DIV_TARGETS,
    MATMUL_TARGETS,
    MUL_TARGETS,
    NEG_TARGETS,
    SDPA_TARGETS,
    SUB_TARGETS,
    as_layer_norm,
    as_linear,
    emit_attention,
    fetch_attr,
    is_shape_read,
    is_softmax,
    is_view,
    merge_origins,
)
from ..ops import reference_attention
from ..registry import Match, Skip

f64 = torch.float64
PROBE_BATCH, PROBE_TOKENS = 2, 5

_AUX_FUNCTIONS = {getattr, operator.getitem, operator.mul, operator.floordiv, operator.add, operator.sub,
                  operator.truediv}


class NotAttention(Exception):
    """Raised while recognizing; its message becomes the reason of a Skip."""


def _scalar(a) -> float | None:
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return float(a)
    if isinstance(a, fx.Node) and a.op == "get_attr":
        t = fetch_attr(a.graph.owning_module, a.target)
        if isinstance(t, torch.Tensor) and t.dim() == 0 and t.is_floating_point():
            return float(t)
    return None


def _scale_op(n: fx.Node):
    """(data input, factor) if ``n`` multiplies or divides by a scalar constant, else None."""
    kind = None
    if n.op == "call_function":
        kind = "mul" if n.target in MUL_TARGETS else "div" if n.target in DIV_TARGETS else None
    elif n.op == "call_method" and n.target in ("mul", "div"):
        kind = n.target
    if kind is None or len(n.args) != 2 or n.kwargs:
        return None
    a, b = n.args
    if kind == "mul" and isinstance(a, fx.Node) and _scalar(b) is not None and _scalar(a) is None:
        return a, _scalar(b)
    if kind == "mul" and isinstance(b, fx.Node) and _scalar(a) is not None:
        return b, _scalar(a)
    if kind == "div" and isinstance(a, fx.Node) and _scalar(b) not in (None, 0.0):
        return a, 1.0 / _scalar(b)
    return None


class Chain:
    """A q/k/v tensor traced back through views (and scalar scales) to the Linear that produced it."""

    def __init__(self, end: fx.Node):
        self.end, self.nodes, self.factor, self.scale_nodes = end, [], 1.0, set()
        n = end
        while True:
            lin = as_linear(n)
            if lin is not None:
                self.linear = lin
                break
            scale = _scale_op(n)
            if scale is not None:
                self.nodes.append(n)
                self.scale_nodes.add(n)
                n, f = scale
                self.factor *= f
                continue
            if not is_view(n) or not isinstance(n.args[0], fx.Node):
                raise NotAttention(f"{_describe(end)} is not a view of a Linear output (found {_describe(n)})")
            self.nodes.append(n)
            n = n.args[0]
        self.nodes.reverse()


def _describe(n: fx.Node) -> str:
    t = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
    return f"'{n.name}' ({t})"


class Probe:
    """Evaluates small parts of the graph on probe tensors (shape arithmetic included)."""

    def __init__(self, gm: fx.GraphModule, x: fx.Node, x_value: torch.Tensor, order: dict, constants: dict):
        self.gm, self.env, self.order = gm, {}, order
        self.constants = constants  # get_attr node -> float64 value, shared by the probes of one analysis
        # tensors whose *shape* equals x's: x and the inputs of LayerNorms that produced it
        self.shape_sources = {}
        n = x
        while n is not None:
            self.shape_sources[n] = x_value
            ln = as_layer_norm(n)
            n = ln.input if ln is not None else None

    def load(self, a: fx.Node):
        """The value of a ``get_attr`` node, float64 for floating tensors (shared by the probes of one analysis)."""
        return self._load(a, {})

    def _load(self, a, env):
        if not isinstance(a, fx.Node):
            return a
        if a in env:
            return env[a]
        if a.op == "get_attr":
            if a not in self.constants:
                t = fetch_attr(self.gm, a.target)
                self.constants[a] = t.detach().to(f64) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            return self.constants[a]
        if a in self.shape_sources:
            return self.shape_sources[a]
        if (a.op == "call_function" and a.target in _AUX_FUNCTIONS) or \
                (a.op == "call_method" and a.target in ("size", "dim")):
            value = self._call(a, env)
            if isinstance(value, torch.Tensor):
                raise NotAttention(f"{_describe(a)} reads a tensor outside the attention")
            return value
        raise NotAttention(f"{_describe(a)} is needed to evaluate the attention but is not part of it")

    def _call(self, n, env):
        args = fx.node.map_aggregate(n.args, lambda a: self._load(a, env))
        kwargs = fx.node.map_aggregate(n.kwargs, lambda a: self._load(a, env))
        if n.op == "call_method":
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        return n.target(*args, **kwargs)

    def run(self, nodes, env, passthrough=()):
        """Evaluate ``nodes`` (any order) given ``env``; nodes in ``passthrough`` copy their data input."""
        env = dict(env)
        for n in sorted(nodes, key=self.order.__getitem__):
            if n in env:
                continue
            if n in passthrough:
                env[n] = env[_scale_op(n)[0]]
                continue
            try:
                env[n] = self._call(n, env)
            except NotAttention:
                raise
            except Exception as e:  # noqa: BLE001 - any failure means the layout is not what we expect
                raise NotAttention(f"evaluating {_describe(n)} on a probe failed ({type(e).__name__}: {e})") from e
        return env


def _coded(shape) -> torch.Tensor:
    return torch.arange(int(torch.tensor(shape).prod()), dtype=f64).reshape(shape)


def _decode_heads(chain: Chain, probe: Probe, x_value, transposed: bool):
    """Run the chain on a coded Linear output; return the (H, d) map of head rows into the Linear's rows."""
    lin = chain.linear
    B, N = x_value.shape[0], x_value.shape[-2]
    F_ = lin.out_features
    y = _coded((B, N, F_))
    env = probe.run(chain.nodes, {lin.node: y, lin.input: x_value}, passthrough=chain.scale_nodes)
    t = env[chain.end] if chain.nodes else y
    if not isinstance(t, torch.Tensor) or t.dim() != 4:
        raise NotAttention(f"{_describe(chain.end)} is not a 4-d (batch, heads, tokens, dim) tensor")
    t = t.long()
    b, n, f = t // (F_ * N), (t // F_) % N, t % F_
    if transposed:
        b, n, f = b.transpose(-2, -1), n.transpose(-2, -1), f.transpose(-2, -1)
    Bt, H, Nt, d = t.shape if not transposed else t.transpose(-2, -1).shape
    if Bt != B or Nt != N:
        raise NotAttention(f"{_describe(chain.end)} does not keep batch and token axes apart")
    ok = (b == torch.arange(B).view(B, 1, 1, 1)).all() and (n == torch.arange(N).view(1, 1, N, 1)).all() \
        and (f == f[:1, :, :1, :]).all()
    if not ok:
        raise NotAttention(f"{_describe(chain.end)} mixes tokens or batch elements into heads")
    head_map = f[0, :, 0, :]
    if head_map.unique().numel() != head_map.numel():
        raise NotAttention(f"{_describe(chain.end)} repeats features across heads")
    return head_map


def _output_chain(anchor: fx.Node, probe: Probe, x_value, H: int, dv: int):
    """Follow the attention output through views to the (batch, tokens, H*dv) tensor; return it and its
    column -> (head, feature) map."""
    nodes, n = [], anchor
    while len(n.users) == 1 and is_view(next(iter(n.users))):
        n = next(iter(n.users))
        nodes.append(n)
    B, N = x_value.shape[0], x_value.shape[-2]
    o = _coded((B, H, N, dv))
    env = probe.run(nodes, {anchor: o})
    z = env[n]
    if not isinstance(z, torch.Tensor) or z.dim() != 3 or z.shape[:2] != (B, N) or z.shape[2] != H * dv:
        raise NotAttention(f"the attention output {_describe(n)} is not merged back to (batch, tokens, heads*dim)")
    z = z.long()
    j, tok, h, b = z % dv, (z // dv) % N, (z // (dv * N)) % H, z // (dv * N * H)
    if not ((b == torch.arange(B).view(B, 1, 1)).all() and (tok == torch.arange(N).view(1, N, 1)).all()
            and (h == h[:1, :1]).all() and (j == j[:1, :1]).all()):
        raise NotAttention(f"{_describe(n)} mixes tokens or batch elements")
    return n, nodes, h[0, 0], j[0, 0]


class Logits:
    """softmax input as ``sum_t coef_t * (q_t @ k_t^T)``: terms keyed by the matmul node."""

    def __init__(self):
        self.terms: dict = {}   # matmul node -> [coef, q Chain, kT Chain]
        self.nodes: set = set()


def _parse_logits(n: fx.Node, coef: float, out: Logits, depth: int = 0) -> None:
    if depth > 64:
        raise NotAttention("softmax input expression is too deep")
    out.nodes.add(n)
    if n.op == "call_function" and n.target in MATMUL_TARGETS or (n.op == "call_method" and n.target == "matmul"):
        a, b = n.args[:2]
        if n not in out.terms:
            out.terms[n] = [0.0, Chain(a), Chain(b), True]
        out.terms[n][0] += coef
        return
    if _einsum_kind(n) == "logits":
        a, b = n.args[1:3]
        if n not in out.terms:
            out.terms[n] = [0.0, Chain(a), Chain(b), False]
        out.terms[n][0] += coef
        return
    scale = _scale_op(n)
    if scale is not None:
        _parse_logits(scale[0], coef * scale[1], out, depth + 1)
        return
    is_add = (n.op == "call_function" and n.target in ADD_TARGETS) or (n.op == "call_method" and n.target == "add")
    is_sub = (n.op == "call_function" and n.target in SUB_TARGETS) or (n.op == "call_method" and n.target == "sub")
    if (is_add or is_sub) and len(n.args) == 2 and not n.kwargs:
        for a, c in zip(n.args, (coef, -coef if is_sub else coef)):
            if isinstance(a, fx.Node) and _scalar(a) is None:
                _parse_logits(a, c, out, depth + 1)
            elif _scalar(a) is None:
                raise NotAttention(f"softmax input {_describe(n)} adds a non-constant")
            # a scalar constant shifts every logit of a row equally: softmax does not see it
        return
    if n.op == "call_function" and n.target in NEG_TARGETS:
        _parse_logits(n.args[0], -coef, out, depth + 1)
        return
    raise NotAttention(f"softmax input {_describe(n)} is not a sum of scaled q @ k^T products "
                       "(an attention mask or bias?)")


def _einsum_kind(n: fx.Node) -> str | None:
    """'logits' for ``einsum('bhqd,bhkd->bhqk', q, k)``, 'pv' for ``einsum('bhqk,bhkd->bhqd', p, v)`` (any
    letters), else None."""
    if not (n.op == "call_function" and n.target is torch.einsum and len(n.args) == 3
            and isinstance(n.args[0], str)):
        return None
    eq = n.args[0].replace(" ", "")
    if "->" not in eq or "." in eq:
        return None
    lhs, out = eq.split("->")
    ops = lhs.split(",")
    if len(ops) != 2 or not all(len(t) == 4 for t in (*ops, out)):
        return None
    (a, b), o = ops, out
    if len(set(a)) != 4 or len(set(b)) != 4 or a[:2] != b[:2] or o[:2] != a[:2]:
        return None
    if a[3] == b[3] and a[2] != b[2] and o[2:] == a[2] + b[2]:
        return "logits"
    if a[3] == b[2] and o[2:] == a[2] + b[3] and a[3] not in o:
        return "pv"
    return None


def _softmax_input(p: fx.Node) -> fx.Node:
    if not is_softmax(p):
        raise NotAttention(f"{_describe(p)} is not a softmax")
    names = ["input", "dim", "_stacklevel", "dtype"]
    bound = dict(zip(names, p.args))
    bound.update(p.kwargs)
    if bound.get("dtype") is not None:
        raise NotAttention("softmax with a dtype argument")
    if bound.get("dim") not in (-1, 3):
        raise NotAttention(f"softmax over dim {bound.get('dim')}, not the key axis")
    return bound["input"]


_SDPA_ARGS = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]


class Candidate:
    """One recognized attention: logit terms, value chain, output node; or the reason it is not one."""

    def __init__(self, anchor: fx.Node):
        self.anchor = anchor
        self.logits = Logits()
        if anchor.op == "call_function" and anchor.target in SDPA_TARGETS:
            bound = dict(zip(_SDPA_ARGS, anchor.args))
            bound.update(anchor.kwargs)
            mask = bound.get("attn_mask")
            if mask is not None:
                hint = f" (a graph input: trace with concrete_args={{'{mask.name}': None}})" \
                    if isinstance(mask, fx.Node) and mask.op == "placeholder" else ""
                raise NotAttention("attention with a mask" + hint)
            if bound.get("is_causal", False) is not False:
                raise NotAttention("causal attention (is_causal is not False)")
            if bound.get("dropout_p", 0.0) != 0.0:
                raise NotAttention(f"attention dropout is active (dropout_p={bound.get('dropout_p')})")
            if bound.get("enable_gqa", False):
                raise NotAttention("grouped-query attention")
            q, k = Chain(bound["query"]), Chain(bound["key"])
            self.scale = bound.get("scale")
            if self.scale is not None and not isinstance(self.scale, (int, float)):
                raise NotAttention("SDPA scale is not a constant")
            self.logits.terms[anchor] = [1.0, q, k, False]
            self.value = Chain(bound["value"])
            self.softmax = None
        else:
            p, v = anchor.args[1:3] if _einsum_kind(anchor) == "pv" else anchor.args[:2]
            self.softmax = p
            _parse_logits(_softmax_input(p), 1.0, self.logits)
            self.value = Chain(v)
            self.scale = 1.0

    def nodes(self) -> set:
        out = {self.anchor} | set(self.value.nodes) | {self.value.linear.node}
        if self.softmax is not None:
            out |= {self.softmax} | self.logits.nodes
        for _, q, k, _ in self.logits.terms.values():
            out |= set(q.nodes) | set(k.nodes) | {q.linear.node, k.linear.node}
        return out


def _analyze(gm: fx.GraphModule) -> dict:
    """anchor node -> Match | Skip for every attention candidate of the graph."""
    results: dict = {}
    lifted: dict = {}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    # what the lifts of one analysis share: float64 constants, decoded head layouts, verification values,
    # q/k params of joined branches and the constants registered for them
    shared = {"constants": {}, "heads": {}, "verified": {}, "qk": {}, "emitted": {}}
    for n in gm.graph.nodes:
        is_sdpa = n.op == "call_function" and n.target in SDPA_TARGETS
        is_pv = ((n.op == "call_function" and n.target in MATMUL_TARGETS) or
                 (n.op == "call_method" and n.target == "matmul")) and is_softmax(n.args[0])
        if _einsum_kind(n) == "pv" and is_softmax(n.args[1]):
            is_pv = True
        if not (is_sdpa or is_pv):
            continue
        try:
            lifted[n] = _lift(gm, Candidate(n), order, shared)
        except NotAttention as e:
            results[n] = Skip([n], str(e))
    _check_closure(lifted, results)
    _check_cost(lifted, results)
    for anchor, lift in lifted.items():
        results[anchor] = Match([lift["z"], anchor], lift, lift["summary"], origins=lift["origins"])
    return results


def _lift(gm: fx.GraphModule, cand: Candidate, order: dict, shared: dict) -> dict:
    x = cand.value.linear.input
    for _, q, k, _ in cand.logits.terms.values():
        if q.linear.input is not x or k.linear.input is not x:
            raise NotAttention("q, k and v are computed from different tensors (cross-attention)")
    x_meta = x.meta.get("tensor_meta")
    d = cand.value.linear.weight.shape[1]
    shape = tuple(x_meta.shape) if x_meta is not None and len(x_meta.shape) == 3 else (PROBE_BATCH, PROBE_TOKENS, d)
    x_shape_probe = torch.zeros(shape, dtype=f64)
    probe = Probe(gm, x, x_shape_probe, order, shared["constants"])

    def decode(chain, transposed):  # joined branches read each other's q/k: decode each chain once
        key = (chain.end, transposed, x, shape)
        if key not in shared["heads"]:
            shared["heads"][key] = _decode_heads(chain, probe, x_shape_probe, transposed)
        return shared["heads"][key]

    vmap = decode(cand.value, False)
    H, dv = vmap.shape
    terms = []
    order_of = order
    # a canonical term order, so joined branches with equal logits get bitwise-equal q/k weights
    for matmul, (coef, q, k, k_transposed) in sorted(cand.logits.terms.items(), key=lambda kv: order_of[kv[0]]):
        if coef == 0.0:
            continue  # a joined branch's own logits at lam == 1 (finite logits: 0 * S == 0 exactly)
        qmap = decode(q, False)
        kmap = decode(k, k_transposed)
        if qmap.shape[0] != H or kmap.shape != qmap.shape:
            raise NotAttention("q, k and v have different head counts or q/k widths")
        terms.append((matmul, coef * q.factor * k.factor, q, qmap, k, kmap))
    if not terms:
        raise NotAttention("softmax input has no nonzero q @ k^T term")
    if cand.scale is None:
        scale = qmap.shape[1] ** -0.5
    else:
        scale = float(cand.scale)
    z, out_nodes, col_head, col_feat = _output_chain(cand.anchor, probe, x_shape_probe, H, dv)

    # head order of the merged output: block h' of dv columns must come from one source head
    order, feats = [], []
    for hp in range(H):
        heads = col_head[hp * dv:(hp + 1) * dv]
        if not (heads == heads[0]).all():
            raise NotAttention("merged output interleaves features of different heads")
        order.append(int(heads[0]))
        feats.append(col_feat[hp * dv:(hp + 1) * dv])

    heads = torch.tensor(order)

    def gather(lin, index, factor=1.0):
        """Rows ``index`` (heads, d) of the Linear's weight and bias, in float64, times ``factor``. Reads the
        float64 copies the verification probe evaluates the Linear with (converted once per analysis)."""
        w = probe.load(lin.param_node("weight"))[index]
        b = probe.load(lin.param_node("bias"))[index] if lin.bias is not None else None
        if factor != 1.0:  # x * 1.0 == x bitwise: skip the copy
            w, b = w * factor, (b * factor if b is not None else None)
        return w, b

    def stack(parts):  # (H, d_t, ...) per term -> head-major rows: head, then term, then feature
        return torch.cat(parts, dim=1).flatten(0, 1)

    # joined branches share their logits: build their q/k weights once (the same tensors for all of them)
    qk_key = (tuple(order), scale) + tuple((m, c, q.linear.node, k.linear.node, qmap.numpy().tobytes(),
                                            kmap.numpy().tobytes()) for m, c, q, qmap, k, kmap in terms)
    if qk_key not in shared["qk"]:
        qw, qb, kw, kb = [], [], [], []
        for _, c, q, qmap, k, kmap in terms:
            for lin, index, factor, ws, bs in ((q.linear, qmap[heads], c * scale, qw, qb),
                                               (k.linear, kmap[heads], 1.0, kw, kb)):
                w, b = gather(lin, index, factor)
                ws.append(w)
                bs.append(b if b is not None else torch.zeros(w.shape[:2], dtype=f64))
        has_qb = any(q.linear.bias is not None for _, _, q, _, _, _ in terms)
        has_kb = any(k.linear.bias is not None for _, _, _, _, k, _ in terms)
        shared["qk"][qk_key] = {"q_weight": stack(qw), "q_bias": stack(qb) if has_qb else None,
                                "k_weight": stack(kw), "k_bias": stack(kb) if has_kb else None}
    vw, vb = gather(cand.value.linear, torch.stack([vmap[h][feats[hp]] for hp, h in enumerate(order)]),
                    cand.value.factor)
    params = dict(shared["qk"][qk_key],
                  v_weight=vw.flatten(0, 1), v_bias=vb.flatten(0, 1) if vb is not None else None)
    nodes = cand.nodes() | set(out_nodes)
    _verify(probe, x, nodes, z, params, H, shape, shared["verified"])
    dtype = cand.value.linear.weight.dtype
    width = sum(qmap.shape[1] for _, _, _, qmap, _, _ in terms)
    kind = "joined" if len(cand.logits.terms) > 1 else ("sdpa" if cand.softmax is None else "softmax")
    linears = sorted({n for n in nodes if as_linear(n) is not None}, key=probe.order.__getitem__)
    return {"x": x, "z": z, "params": params, "heads": H, "dtype": dtype, "nodes": nodes, "terms": terms,
            "emitted": shared["emitted"],
            "qk_width": width, "origins": merge_origins(linears),
            "summary": f"{kind} attention, {H} heads (q/k width {width}, v width {dv}) -> multi_head_attention"}


def _verify(probe, x, nodes, z, params, H, shape, verified: dict):
    """Evaluate the original subgraph and the lifted op in float64 on one random input; they must agree.
    ``verified`` keeps the values computed on that input per (x, shape), so branches that share nodes (the
    joined logits read every branch's q/k) evaluate them once."""
    key = (x, shape)
    if key not in verified:
        gen = torch.Generator().manual_seed(1234)
        x_value = torch.randn(shape, dtype=f64, generator=gen)
        verified[key] = {x: x_value}
    env = verified[key]
    x_value = env[x]
    probe.shape_sources = {k: x_value for k in probe.shape_sources}
    env.update(probe.run(nodes - env.keys(), env))
    expected = env[z]
    projections = verified.setdefault(("projections",) + key, {})

    def project(x, w, b):  # joined branches share q/k weights: project x with them once
        if (id(w), id(b)) not in projections:
            projections[id(w), id(b)] = (w, b, torch.nn.functional.linear(x, w, b))
        return projections[id(w), id(b)][2]

    actual = reference_attention(x_value, params, H, project)
    err = (expected - actual).abs().max().item() / max(expected.abs().max().item(), 1e-30)
    if not err <= 1e-9:
        raise NotAttention(f"recognized attention did not verify numerically (rel. error {err:.2g})")


def _check_closure(lifted: dict, results: dict) -> None:
    """Drop lifts whose intermediate values are read outside the lifted subgraphs (repeat to stability)."""
    changed = True
    while changed:
        changed = False
        inside = set().union(*(lift["nodes"] for lift in lifted.values())) if lifted else set()
        for anchor, lift in list(lifted.items()):
            for n in lift["nodes"]:
                if n is lift["z"]:
                    continue
                outside = [u for u in n.users if u not in inside and not is_shape_read(u)]
                if outside:
                    results[anchor] = Skip([anchor], f"intermediate value {_describe(n)} is also read by "
                                                     f"{_describe(outside[0])} outside the attention")
                    del lifted[anchor]
                    changed = True
                    break


def _check_cost(lifted: dict, results: dict) -> None:
    """Joined logits with 0 < lam < 1 would give every branch a B-times wider q/k: leave those unfused."""
    groups: list = []
    for anchor, lift in lifted.items():
        keys = {id(t[0]) for t in lift["terms"]}
        merged = [g for g in groups if g["keys"] & keys]
        group = {"keys": keys, "anchors": [anchor]}
        for g in merged:
            group["keys"] |= g["keys"]
            group["anchors"] += g["anchors"]
            groups.remove(g)
        groups.append(group)
    for g in groups:
        before, after = {}, {}
        for a in g["anchors"]:
            lift = lifted[a]
            for term in lift["terms"]:
                before[term[0]] = term[3].numel()
            form = tuple((id(t[0]), t[1]) for t in lift["terms"])
            after[form] = lift["heads"] * lift["qk_width"]
        if sum(after.values()) > sum(before.values()):
            for a in g["anchors"]:
                results[a] = Skip([a], "branches are joined at the softmax with 0 < lam < 1: merging would widen "
                                       "every branch's q/k by the branch count; left as is (exact at lam 0 and 1)")
                del lifted[a]


class LiftAttention:
    name = "lift_attention"
    phase = "lift"

    def match(self, node, ctx):
        return ctx.cached("attention", lambda: _analyze(ctx.gm)).get(node)

    def replace(self, match, ctx):
        lift = match.data
        with ctx.graph.inserting_before(lift["z"]):
            new = emit_attention(ctx.graph, ctx.resolve(lift["x"]), lift["params"], lift["heads"], lift["dtype"],
                                 lift["z"].name + "_attn", lift["origins"], lift["emitted"])
        ctx.replace_node(lift["z"], new)
        return {"heads": lift["heads"]}
