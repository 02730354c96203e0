"""Affine forms of graph nodes: their algebra (``forms``), the analysis of a graph (``analysis``) and emitting
a form as nodes (``materialize``). ``merge_affine`` and the widening patterns build on it."""

from .analysis import AffineAnalysis, Region, affine_analysis
from .forms import Affine, FormKey, form_cost, normalized_bias
from .materialize import materialize

__all__ = ["Affine", "AffineAnalysis", "FormKey", "Region", "affine_analysis", "form_cost", "materialize",
           "normalized_bias"]
