"""Small readers of fused graphs shared by the tests."""

import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from fxrep.ir import activation_key
from fxrep.stats import graph_stats


def stats(gm):
    return graph_stats(gm)


def activations(gm):
    return [n for n in gm.graph.nodes if activation_key(n) is not None]


def hidden_widths(gm, inputs):
    """Last-dim widths of the activations' outputs (by shape propagation on ``inputs``)."""
    ShapeProp(gm).propagate(*inputs)
    return sorted(n.meta["tensor_meta"].shape[-1] for n in activations(gm))


def sdpa_calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and n.target is F.scaled_dot_product_attention]
