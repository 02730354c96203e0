"""What ops do besides computing a value: views and aliasing, in-place writes, layout dependence, guards.

These decide where value-based rewrites (CSE, affine forms, merges) are allowed: see ``mutation_hazards``.
"""

from __future__ import annotations

import torch
from torch import fx

from ..ops import multi_head_attention
from .binding import bind
from .readers import activation_key, fetch_attr, is_call, is_shape_read, is_softmax
from .targets import (
    ARITHMETIC_TARGETS,
    ELEMENTWISE_FUNCTIONS,
    ELEMENTWISE_METHODS,
    GUARD_TARGETS,
    INPLACE_OPERATORS,
    LAYER_NORM_TARGETS,
    LAYOUT_RESETTING,
    LINEAR_TARGETS,
    MATMUL_TARGETS,
    NEG_TARGETS,
    SDPA_TARGETS,
    VIEW_FUNCTIONS,
    VIEW_METHODS,
)


def is_guard(node: fx.Node) -> bool:
    """A runtime check with no result (``torch._assert``, fx's ``_assert_is_none`` of a fixed argument):
    never dead code, never folded."""
    return node.op == "call_function" and node.target in GUARD_TARGETS


def is_view(node: fx.Node) -> bool:
    """A view op (``reshape``, ``permute``, ``getitem``, ``contiguous``, ...): same values as its input, and
    possibly the same memory."""
    return (node.op == "call_method" and node.target in VIEW_METHODS) or \
        (node.op == "call_function" and node.target in VIEW_FUNCTIONS)


def is_inplace(node: fx.Node) -> bool:
    """Writes to one of its inputs: ``x.add_(y)``, ``x += y``, ``x[i] = y``, ``F.relu(x, inplace=True)`` (or
    ``F.relu(x, True)``), an ``nn.ReLU(inplace=True)`` module call. Such a node is never merged, folded or
    moved."""
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).endswith("__")
    if node.op == "call_function":
        if node.target in INPLACE_OPERATORS or node.kwargs.get("inplace") is True:
            return True
        name = getattr(node.target, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):
            return True
        args = bind(node) if node.target not in ARITHMETIC_TARGETS else None
        return args is not None and args.get("inplace") is True
    if node.op == "call_module":
        return getattr(fetch_attr(node.graph.owning_module, node.target), "inplace", False) is True
    return False


def is_elementwise(node: fx.Node) -> bool:
    """An op declared elementwise (``OpSpec.elementwise``: arithmetic, activations, casts, copies), not in
    place: each output element from the same element of its (broadcast) inputs."""
    if is_inplace(node):
        return False
    if node.op == "call_method":
        return node.target in ELEMENTWISE_METHODS
    return node.op == "call_function" and node.target in ELEMENTWISE_FUNCTIONS


def layout_sensitive_reader(node: fx.Node) -> fx.Node | None:
    """The first node that could see the difference if ``node``'s value had other strides, or None.

    Readers are followed through views and elementwise ops (whose outputs inherit their input's layout)
    until an op whose result does not depend on it (Linear, LayerNorm) or a shape read. Anything else counts
    as sensitive: ``view`` (raises on some strides), in-place ops, the graph output (the caller may rely on
    the layout) and every op not classified here."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        for user in n.users:
            if user in seen:
                continue
            seen.add(user)
            if is_shape_read(user) or (is_call(user, LAYOUT_RESETTING) and not is_inplace(user)):
                continue
            if is_inplace(user) or user.op == "output" or (user.op == "call_method"
                                                           and user.target == "view"):
                return user
            if is_view(user) or is_elementwise(user):
                todo.append(user)
                continue
            return user
    return None


_OWNING_FUNCTIONS = LINEAR_TARGETS | LAYER_NORM_TARGETS | MATMUL_TARGETS | (ARITHMETIC_TARGETS - NEG_TARGETS)


def owns_its_memory(node) -> bool:
    """True where ``node``'s value is a tensor no other value aliases: the output of a Linear, LayerNorm or
    out-of-place arithmetic. Placeholders, parameters, views and ops that may return their input do not."""
    if not isinstance(node, fx.Node) or is_inplace(node):
        return False
    if node.op == "call_function":
        return node.target in _OWNING_FUNCTIONS
    if node.op == "call_module":
        return isinstance(fetch_attr(node.graph.owning_module, node.target),
                          (torch.nn.Linear, torch.nn.LayerNorm))
    return False


def _fresh(node: fx.Node) -> bool:
    """The op allocates its result: it can never return (a view of) one of its inputs."""
    return owns_its_memory(node) or (activation_key(node) is not None and node.op == "call_function") or \
        is_softmax(node) or is_call(node, SDPA_TARGETS) or node.target is multi_head_attention


def write_is_invisible(node: fx.Node) -> bool:
    """An in-place op whose write nobody else can see: its target owns its memory and this op is its only
    reader (``nn.ReLU(inplace=True)`` right after a Linear). Such an op may become out-of-place."""
    target = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    return target is not None and owns_its_memory(target) and len(target.users) == 1


def mutation_hazards(graph: fx.Graph) -> set:
    """Nodes that value-based rewrites (CSE, affine forms, merges) must leave alone: every value an in-place
    op writes to, every alias of it (found through ops that may return their input or a view of it, up and
    down the graph), the in-place ops themselves, and every reader of those values (a reader that runs after
    the write sees the written value, so moving or merging it changes its result).

    The written value is a hazard even where the write is invisible today: a rewrite that replaced it (say,
    by a CSE'd equal value) would redirect the write into a value others read. Only the in-place op itself is
    left out where its write is invisible, so that ``functionalize_modules`` can make it out-of-place."""
    inplace = [n for n in graph.nodes if is_inplace(n)]
    aliases: set = set()
    todo = inplace + [n.args[0] for n in inplace if n.args and isinstance(n.args[0], fx.Node)]
    while todo:
        n = todo.pop()
        if n in aliases:
            continue
        aliases.add(n)
        if n.op in ("call_function", "call_method", "call_module") and not _fresh(n):
            todo += [a for a in n.all_input_nodes if a.op != "get_attr" or is_inplace(n)]
        todo += [u for u in n.users if u.op != "output" and not _fresh(u)]
    hazards = aliases | {u for n in aliases for u in n.users}
    return hazards - {n for n in inplace if write_is_invisible(n)}
