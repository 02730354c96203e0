"""The built-in patterns, in the order ``fuse`` runs them inside each phase."""

from .affine import MergeAffine
from .attention import LiftAttention
from .canonicalize import DropEmptyAttentionMask, DropIdentity, FoldConstants, FunctionalizeModules
from .cse import EliminateCommonSubexpressions
from .layernorm import ExtractLayerNormAffine
from .layout import CancelPermutes, PermutesOutOfSums, UnflattenLinearRows
from .lower import LowerAttention
from .mha import LiftMultiheadAttention
from .rank_aware import RankAwareAttention
from .sums import ExpandStackedSums
from .widen import CollapseAttention, WidenAttention, WidenMLP


def builtin_patterns() -> list:
    """New instances of the built-in patterns (a list the caller owns)."""
    return [
        DropIdentity(), DropEmptyAttentionMask(), FunctionalizeModules(), FoldConstants(),
        ExpandStackedSums(), UnflattenLinearRows(), PermutesOutOfSums(), CancelPermutes(),
        EliminateCommonSubexpressions(), ExtractLayerNormAffine(),
        LiftMultiheadAttention(), LiftAttention(),
        MergeAffine(),
        CollapseAttention(), WidenAttention(), WidenMLP(),
        RankAwareAttention(), LowerAttention(),
    ]


__all__ = ["builtin_patterns", "MergeAffine", "LiftAttention", "DropIdentity", "DropEmptyAttentionMask",
           "FoldConstants", "FunctionalizeModules", "EliminateCommonSubexpressions", "ExtractLayerNormAffine",
           "LowerAttention", "RankAwareAttention", "ExpandStackedSums", "LiftMultiheadAttention",
           "UnflattenLinearRows", "PermutesOutOfSums", "CancelPermutes",
           "CollapseAttention", "WidenAttention", "WidenMLP"]
