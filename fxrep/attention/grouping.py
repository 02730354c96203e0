"""Which lifts of one graph may be applied together: a lift whose intermediate values are read outside the
lifted subgraphs is dropped, and joined logits are lifted only where that does not widen q/k."""

from __future__ import annotations

from ..ir.readers import is_shape_read
from ..pattern import Skip
from .recognize import describe


def check_closure(lifted: dict, results: dict) -> None:
    """Drop lifts whose intermediate values are read outside the lifted subgraphs (repeat to stability)."""
    changed = True
    while changed:
        changed = False
        inside = set().union(*(lift.nodes for lift in lifted.values())) if lifted else set()
        for anchor, lift in list(lifted.items()):
            for n in lift.nodes:
                if n is lift.z:
                    continue
                outside = [u for u in n.users if u not in inside and not is_shape_read(u)]
                if outside:
                    results[anchor] = Skip([anchor], f"intermediate value {describe(n)} is also read by "
                                                     f"{describe(outside[0])} outside the attention")
                    del lifted[anchor]
                    changed = True
                    break


def _sharing_groups(lifted: dict) -> list:
    """Lifts grouped by shared logit products (joined branches read each other's q @ k^T)."""
    groups: list = []
    for anchor, lift in lifted.items():
        keys = {id(t.product) for t in lift.terms}
        group = {"keys": keys, "anchors": [anchor]}
        for g in [g for g in groups if g["keys"] & keys]:
            group["keys"] |= g["keys"]
            group["anchors"] += g["anchors"]
            groups.remove(g)
        groups.append(group)
    return [g["anchors"] for g in groups]


def check_cost(lifted: dict, results: dict) -> None:
    """Joined logits with 0 < lam < 1 would give every branch a B-times wider q/k: leave those unfused."""
    for anchors in _sharing_groups(lifted):
        before, after = {}, {}
        for a in anchors:
            lift = lifted[a]
            for t in lift.terms:
                before[t.product] = t.qmap.numel()
            form = tuple((id(t.product), t.coef) for t in lift.terms)
            after[form] = lift.heads * lift.qk_width
        if sum(after.values()) > sum(before.values()):
            for a in anchors:
                results[a] = Skip([a], "branches are joined at the softmax with 0 < lam < 1: merging would "
                                       "widen every branch's q/k by the branch count; left as is (exact at "
                                       "lam 0 and 1)")
                del lifted[a]
