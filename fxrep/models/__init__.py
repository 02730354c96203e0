"""Branched ViTs registered with timm: ``fxrep_deit_tiny_d6b2``, ``_d4b3``, ``_d3b4`` (and ``_d12b1``)."""

from .branch_from import branch_from
from .branched_vit import BranchedAttention, BranchedBlock, BranchedMlp, get_join, set_join
from .registry import BranchedVisionTransformer

__all__ = ["BranchedAttention", "BranchedBlock", "BranchedMlp", "BranchedVisionTransformer", "branch_from",
           "get_join", "set_join"]
