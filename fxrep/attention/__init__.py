"""Recognizing attention in traced graphs and lifting it to fxrep's canonical ``multi_head_attention`` op:
``recognize`` reads the subgraph's structure, ``probe`` its head layout, ``lift`` builds the op's weights,
``grouping`` decides which lifts apply together, ``merge`` builds the weights of merged attention ops. The
patterns are ``fxrep.patterns.attention`` and ``fxrep.patterns.widen``."""

from .grouping import check_closure, check_cost
from .lift import Lift, LiftCache, lift
from .recognize import Candidate, NotAttention, is_anchor

__all__ = ["Candidate", "Lift", "LiftCache", "NotAttention", "check_closure", "check_cost", "is_anchor",
           "lift"]
