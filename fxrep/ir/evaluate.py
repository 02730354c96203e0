"""One constant evaluator: run a single node's op on values the caller supplies.

``fold_constants`` evaluates ops whose inputs are all parameters; the attention probe evaluates view chains
and shape arithmetic on coded tensors. Both go through ``evaluate``, so a node is computed exactly as the
GraphModule would compute it.
"""

from __future__ import annotations

import torch
from torch import fx

from .readers import fetch_attr


def evaluate(node: fx.Node, load):
    """The value of ``node`` (``call_function`` or ``call_method``), with every input node replaced by
    ``load(input)``. No autograd."""
    args = fx.node.map_aggregate(node.args, lambda a: load(a) if isinstance(a, fx.Node) else a)
    kwargs = fx.node.map_aggregate(node.kwargs, lambda a: load(a) if isinstance(a, fx.Node) else a)
    with torch.no_grad():
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
    raise ValueError(f"cannot evaluate a {node.op} node ({node.name})")


def load_attribute(node: fx.Node):
    """The value behind a ``get_attr`` node."""
    return fetch_attr(node.graph.owning_module, node.target)
