"""The front end: a graph captured by ``torch.export`` (an ``ExportedProgram``'s module, in ATen or core ATen)
rewritten to the torch-level spellings the recognition layer (``fxrep.ir``) reads, so that every pattern sees
one spelling of each op whatever captured the graph.

Its rewrites are patterns on the contract of every other (``fxrep.pattern``): matching never mutates, the
engine erases, and the engine runs them, as the phase ``FRONTEND``, to a fixed point before the registry's
phases, on every GraphModule given to ``fuse``. They are not in the registry: a registry without the built-in
patterns still reads exported graphs. Order matters: core ATen decompositions are folded back while they are
still in ATen (``core_aten``), then every ATen overload with a torch spelling is rewritten (``spellings``);
fx's guards of the arguments tracing fixed become portable module calls (``guards``).
A new ATen spelling is one entry of its op's ``OpSpec.aten`` (``fxrep.ir.known_ops``; ``spellings.TABLE`` is
derived from them); a new decomposition, one ``FoldPattern``.
"""

from .core_aten import CORE_ATEN_FOLDS, Fold, FoldPattern
from .guards import FixedArgument, PortableGuards
from .spellings import ATEN_TO_TORCH, TABLE

ATEN_PATTERNS = (*CORE_ATEN_FOLDS, ATEN_TO_TORCH)


def frontend_patterns(specialized: dict | None = None, aten: bool = True) -> list:
    """The front-end patterns, in order: the ATen ones (for a GraphModule given to ``fuse``, which may come
    from ``torch.export``; ``aten=False`` for a graph fxrep traced itself), then the guards of the arguments
    tracing fixed (``specialized``: name -> value)."""
    return [*(ATEN_PATTERNS if aten else ()), PortableGuards(specialized)]


__all__ = ["frontend_patterns", "ATEN_PATTERNS", "CORE_ATEN_FOLDS", "ATEN_TO_TORCH", "TABLE", "Fold",
           "FoldPattern", "FixedArgument", "PortableGuards"]
