"""Which parallel branches may merge: sibling nonlinear ops (MLP activations, attention ops) grouped by the
node their outputs end in, their input, activation and dtype, and the Skip of every near miss beside a group
(docs/identities.md §2 and §8). The widen patterns (``patterns/widen.py``) rewrite the groups found here.
"""

from __future__ import annotations

from torch import fx

from .affine import AffineAnalysis, affine_analysis
from .ir import activation_key, arith_kind, as_layer_norm, as_linear, attention_view, input_of
from .pattern import Skip


def _owner(node: fx.Node, analysis: AffineAnalysis):
    """The single stop node all Linear readers of ``node`` flow into, or None."""
    owners = set()
    for u in node.users:
        lin = as_linear(u)
        if lin is None or lin.input is not node or u not in analysis.owner:
            return None
        owners |= analysis.owner[u]
    return next(iter(owners)) if len(owners) == 1 else None


def _summed_owner(node: fx.Node, hazards) -> fx.Node | None:
    """Where ``node`` (an attention without an output projection) ends up when its one reader is arithmetic:
    the first node of that chain of sole arithmetic readers that is read otherwise; None if ``node`` is read
    by anything else. Branches with the same end are summed together; reading each branch's columns of the
    merged op is exact whatever the arithmetic is."""
    n = node
    while len(n.users) == 1 and arith_kind(next(iter(n.users))) is not None and n not in hazards:
        n = next(iter(n.users))
    return n if n is not node and n not in hazards else None


def _describe_unowned(kind: str) -> str:
    if kind == "attention":
        return ("attention branches on one input whose outputs are read by more than Linears and arithmetic "
                "that end in one node: they are not one sum, so they stay apart")
    return ("MLP branches on one input whose outputs are not read only by Linears that are summed: the "
            "merged op's columns have no Linear to be split into, so they stay apart")


def _describe_inputs(xs) -> str:
    lns = [as_layer_norm(x) for x in xs]
    if all(ln is not None for ln in lns) and len({ln.input for ln in lns}) == 1:
        eps = sorted({ln.eps for ln in lns})
        if len(eps) > 1:
            return "branches normalize the same tensor with different LayerNorm eps (" + \
                   " vs ".join(f"{e:g}" for e in eps) + ")"
        return "branches read LayerNorms of the same tensor that could not be shared"
    return "branches read different tensors (" + ", ".join(sorted({x.name for x in xs})) + ")"


def _describe_mixed(nodes) -> str:
    """Why branches whose pre-activations are sums of Linears (partly joined, 0 < lam < 1, or lam = 0 written
    as a mix) stay apart: merge_affine writes such a sum as one Linear unless one of its Linears is also read
    elsewhere, which is then named."""
    leaks = set()
    for n in nodes:
        todo, seen = [input_of(n)], set()
        while todo:
            a = todo.pop()
            if a in seen or not isinstance(a, fx.Node):
                continue
            seen.add(a)
            if as_linear(a) is not None:
                leaks |= {a.name for u in a.users if u not in seen and arith_kind(u) is None
                          and u not in nodes}
            elif arith_kind(a) is not None:
                todo += [b for b in a.args if isinstance(b, fx.Node)]
    pres = ", ".join(dict.fromkeys(input_of(n).name for n in nodes))
    verb = "is" if len(leaks) == 1 else "are"
    why = f": {', '.join(sorted(leaks))} {verb} also read elsewhere, so fxrep keeps the sum as written" \
        if leaks else ""
    return (f"pre-activations {pres} are sums of Linears, not one Linear each{why}; these branches do not "
            "widen")


def _masking_key(att) -> tuple:
    """Attention ops merge only with the same mask node, the same ``is_causal`` and, with a mask, the same
    heads per tiling of a per-head mask (docs/identities.md §6)."""
    return (att.attn_mask, att.is_causal, att.tokens_first,
            att.num_heads // att.mask_repeats if att.attn_mask is not None else None)


def _split_by_masking(nodes, skipped: list) -> dict:
    """{``_masking_key``: its part of ``nodes``}; the branches left out of the largest part are reported."""
    parts: dict = {}
    for n in nodes:
        parts.setdefault(_masking_key(attention_view(n)), []).append(n)
    if len(parts) > 1:
        largest = max(parts.values(), key=len)
        odd = [n for ns in parts.values() if ns is not largest for n in ns]
        skipped.append(Skip(odd, "attention branches on one input use different masks or is_causal (or "
                                 "per-head masks over different head counts): merged only where they agree"))
    return parts


def sibling_keys(ctx, kind: str) -> dict:
    """{branch node of ``kind`` ('mlp' or 'attention'): its group key}, for the branches that may merge with
    others: the node their outputs end in, their activation, dtype and input, and (attention) their masking.
    Branches with equal keys merge (the widen patterns' ``group_key``)."""
    return ctx.analysis(_sibling_groups, kind)[0]


def sibling_near_misses(ctx, kind: str) -> list:
    """The Skips of the branches of ``kind`` beside a group that do not merge with it, with the reason."""
    return ctx.analysis(_sibling_groups, kind)[1]


def _sibling_groups(ctx, kind: str) -> tuple[dict, list]:
    analysis = affine_analysis(ctx)
    groups: dict = {}
    shared_pre: list = []  # MLP branches whose pre-activation is also read elsewhere
    mixed_pre: dict = {}   # MLP branches whose pre-activation is arithmetic on Linears, not one Linear
    unowned: dict = {}     # branches on one input whose output is not read by Linears into one sum
    for n in ctx.graph.nodes:
        if kind == "mlp":
            key = activation_key(n)
            pre = as_linear(input_of(n)) if key is not None else None
            if pre is None:
                pre_node = input_of(n) if key is not None else None
                if isinstance(pre_node, fx.Node) and arith_kind(pre_node) is not None:
                    mixed_pre.setdefault((_owner(n, analysis), key), []).append(n)
                continue
            x, dtype = pre.input, pre.weight.dtype
            if len(pre.node.users) != 1:
                shared_pre.append((n, key, x, dtype))
                continue
        else:
            att = attention_view(n)
            if att is None:
                continue
            key, x, dtype = "attention", att.input, att.dtype
        owner = _owner(n, analysis)
        if owner is None and kind == "attention":  # no output projection: summed as it is
            owner = _summed_owner(n, ctx.mutation_hazards())
        if owner is None:
            unowned.setdefault((key, x), []).append(n)
            continue
        groups.setdefault((owner, key, dtype), {}).setdefault(x, []).append(n)
    keys, skipped = {}, _unmerged_beside(kind, groups, unowned)
    for n, key, x, dtype in shared_pre:
        owner = _owner(n, analysis)
        if x in groups.get((owner, key, dtype), {}):
            skipped.append(Skip([n], f"this branch's pre-activation {input_of(n).name} is also read by "
                                     "another op: it cannot widen with the branches beside it"))
    for (owner, key), nodes in mixed_pre.items():
        beside = sum(len(ns) for (o, k, _), by_input in groups.items() if (o, k) == (owner, key)
                     for ns in by_input.values())
        if owner is not None and len(nodes) + beside > 1:
            skipped.append(Skip(nodes, _describe_mixed(nodes), provisional=True))
    for group, by_input in groups.items():
        for x, nodes in by_input.items():
            parts = _split_by_masking(nodes, skipped) if kind == "attention" else {None: nodes}
            keys.update((n, (*group, x, masking)) for masking, part in parts.items() if len(part) > 1
                        for n in part)
        if len(by_input) > 1:  # report the branches left out of the largest group
            largest = max(by_input.values(), key=len)
            odd = [n for ns in by_input.values() if ns is not largest for n in ns]
            skipped.append(Skip(odd, _describe_inputs(list(by_input))))
    return keys, skipped


def _unmerged_beside(kind: str, groups: dict, unowned: dict) -> list:
    """Skips for branches on one input that do not merge with those beside them: alone in the node they
    flow into, or read by more than Linears and arithmetic."""
    skipped, parts_at = [], {}
    for (_, key, _), by_input in groups.items():
        for x, ns in by_input.items():
            parts_at.setdefault((key, x), []).append(ns)
    for parts in parts_at.values():  # branches alone in their sums, beside branches summed elsewhere
        alone = [ns[0] for ns in parts if len(ns) == 1]
        if len(parts) > 1 and alone:
            skipped.append(Skip(alone, f"branches on one input flow into {len(parts)} different nodes (one "
                                       "is read besides the sum, say): only branches summed into one node "
                                       "merge"))
    for (key, x), nodes in unowned.items():
        beside = sum(len(ns) for ns in parts_at.get((key, x), ()))
        if len(nodes) + beside > 1:  # candidates beside it: it is the reason they do not all merge
            skipped.append(Skip(nodes, _describe_unowned(kind)))
    return skipped
