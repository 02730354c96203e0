"""``lift_attention``: recognize attention in any common traced form and lift it to one canonical op.

Recognized (after ``symbolic_trace``), in any mix:

- ``F.scaled_dot_product_attention(q, k, v)`` (timm's fused path, explicit ``scale=`` or the default);
- ``softmax(s * (q @ k.transpose(-2, -1)), dim=-1) @ v`` with the scale before or after the matmul, softmax as
  function, method or module, and softmax inputs that are *sums of scaled logit products*: the joined
  branches of docs/identities.md §3, ``(1 - lam) * S_i + lam * mean_j S_j``;
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

import torch

from ..attention import Candidate, LiftCache, NotAttention, check_closure, check_cost, is_anchor, lift
from ..attention.recognize import describe
from ..ir import emit_attention
from ..ir.readers import as_float_cast, is_shape_read, is_softmax
from ..pattern import Match, Skip


def analyze(gm) -> dict:
    """anchor node -> Match | Skip for every attention candidate of the graph."""
    results: dict = {}
    lifted: dict = {}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    cache = LiftCache()
    for n in gm.graph.nodes:
        if not is_anchor(n):
            continue
        try:
            lifted[n] = lift(gm, Candidate(n), order, cache)
        except NotAttention as e:
            results[n] = Skip([n], str(e))
    _unrecognized_softmaxes(gm, results)
    check_closure(lifted, results)
    check_cost(lifted, results)
    for anchor, found in lifted.items():
        results[anchor] = Match([found.z, anchor], found, found.summary, origins=found.origins)
    return results


def _unrecognized_softmaxes(gm, results: dict) -> None:
    """A softmax that no attention candidate ends in gets a Skip saying what reads it, so an attention written
    in a spelling fxrep does not know yet is never passed over in silence."""
    for n in gm.graph.nodes:
        if not is_softmax(n) or n in results:
            continue
        readers = [u for u in n.users if not is_shape_read(u)]
        cast = [as_float_cast(u) for u in readers]
        if any(is_anchor(u) for u in readers) or any(c is n and any(is_anchor(v) for v in u.users)
                                                      for u, c in zip(readers, cast)):
            continue
        what = ", ".join(describe(u) for u in readers[:2]) or "nothing"
        results[n] = Skip([n], f"softmax read by {what}, not multiplied with values: not recognized as "
                               f"attention")


def _lifts(ctx) -> dict:
    return analyze(ctx.gm)


class LiftAttention:
    name = "lift_attention"
    phase = "lift"

    def match(self, node, ctx):
        return ctx.analysis(_lifts).get(node)

    def replace(self, match, ctx):
        found = match.data
        x, tokens_first = ctx.resolve(found.x), found.tokens_first
        with ctx.graph.inserting_before(found.z):
            if found.transpose_out:
                # the output is read in the other layout: attend on the input in that layout, so that the
                # readers (an output projection) read the attention itself and the widening patterns see it
                x, tokens_first = ctx.graph.call_function(torch.transpose, (x, 0, 1)), not tokens_first
            new = emit_attention(ctx.graph, x, found.params, found.heads, found.dtype,
                                 found.z.name + "_attn", found.origins, found.emitted,
                                 attn_mask=found.attn_mask, is_causal=found.is_causal,
                                 tokens_first=tokens_first)
        ctx.replace_node(found.z, new)
        return {"heads": found.heads}
