"""``merge_affine``: every chain of Linears, scales and sums between two nonlinear ops becomes the fewest
Linears.

This one pattern implements scale folding (LayerScale, constant weights, ``1/B`` averages, join coefficients),
the merging of Linears that read the same tensor and are summed, and the collapse of joined pre-activations
(docs/identities.md §3 and §4). It works on *affine forms*: for a node whose value is affine in some other
nodes (its *bases*), the form is ``sum_k T_k base_k + bias`` where each ``T_k`` is a scalar (``c * I``), a
vector (``diag(v)``) or a matrix, all in float64. Forms are computed in topological order through

    linear(a, W, b)     add / sub / neg     mul / div by a scalar or per-channel constant

A node is a *stop* node (it must exist in the rewritten graph) when something other than these ops reads
it; its form is then materialized as ``linear(base_1, T_1, bias) + ... ``. The nodes whose forms feed stop
nodes form *regions*; a region is rewritten only when that lowers its multiply-adds per token (or keeps them
and lowers the op count), so the pattern never makes a model slower in its own cost model. Stop nodes of one
region with bitwise-identical forms are materialized once: that is what makes ``B`` joined branches at
``lam == 1`` read one pre-activation.

Before (a joined 2-branch pre-activation at lam = 1)::

    z1 = linear(n, W1, b1); z2 = linear(n, W2, b2)
    m = (z1 + z2) / 2
    a1 = z1 * 0.0 + m * 1.0;  a2 = z2 * 0.0 + m * 1.0      # (1 - lam) z_i + lam * mean

After::

    a = linear(n, (W1 + W2) / 2, (b1 + b2) / 2)           # read by both branches' GELU, then CSE'd
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from ..affine import Affine, AffineAnalysis, FormKey, Region, affine_analysis, form_cost, materialize
from ..ir import as_linear, merge_origins
from ..pattern import Match


@dataclass
class RegionRewrite:
    """What ``merge_affine`` matched: one region of an analysis, and its cost before and after."""

    region: Region
    analysis: AffineAnalysis
    macs_before: int
    macs_after: int


def _node_cost(n: fx.Node, f: Affine) -> int:
    lin = as_linear(n)
    if lin is not None:
        return lin.weight.numel()
    return f.out_size() or 1


class MergeAffine:
    name = "merge_affine"
    phase = "fuse"

    def match(self, node, ctx):
        analysis = affine_analysis(ctx)
        region = analysis.region_at.get(node)
        return self._evaluate(region, analysis) if region is not None else None

    def _evaluate(self, region, analysis):
        nodes = set().union(*region.cones.values())
        macs_before = sum(_node_cost(n, analysis.forms[n]) for n in nodes)
        ops_before = len(nodes)
        seen = {}
        for f in region.stops:
            seen.setdefault(FormKey(analysis.forms[f], analysis.order), analysis.forms[f])
        costs = [form_cost(form) for form in seen.values()]
        macs_after = sum(c[0] for c in costs)
        ops_after = sum(c[1] for c in costs)
        if macs_after < macs_before or (macs_after == macs_before and ops_after < ops_before):
            linears = [n for n in nodes if as_linear(n) is not None]
            summary = (f"{len(linears)} Linear + {ops_before - len(linears)} scale/sum ops -> "
                       f"{sum(1 for f in seen.values() for t in f.terms.values() if t.dim() == 2)} Linear"
                       f" ({ops_after} ops)")
            return Match(sorted(nodes, key=analysis.order.__getitem__),
                         RegionRewrite(region, analysis, macs_before, macs_after), summary)
        return None

    def replace(self, match, ctx):
        region, analysis = match.data.region, match.data.analysis
        made: dict = {}
        graph = ctx.graph
        params_before = sum(as_linear(n).weight.numel() for n in match.nodes if as_linear(n) is not None)
        params_after = 0
        for f in region.stops:
            form = analysis.forms[f]
            key = FormKey(form, analysis.order)
            if key not in made:
                cone = region.cones[f]
                origins = merge_origins([n for n in sorted(cone, key=analysis.order.__getitem__)
                                         if as_linear(n) is not None])
                with graph.inserting_before(f):
                    made[key] = materialize(graph, form, ctx, analysis.order, f.name, origins)
                params_after += sum(t.numel() for t in form.terms.values() if t.dim() == 2)
            ctx.replace_node(f, made[key])
        return {"macs_before": match.data.macs_before, "macs_after": match.data.macs_after,
                "params_before": params_before, "params_after": params_after}
