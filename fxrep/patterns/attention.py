"""placeholder, replaced below"""
from ..registry import Match  # noqa: F401


class LiftAttention:
    name = "lift_attention"
    phase = "lift"

    def match(self, node, ctx):
        return None

    def replace(self, match, ctx):
        return None
