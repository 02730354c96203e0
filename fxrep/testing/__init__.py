"""Tools for proving a fused model equivalent: the assertion and hypothesis strategies fxrep's own tests use.

    from fxrep.testing import assert_fused_equivalent, branched_mlp_blocks
    @given(branched_mlp_blocks())
    def test_my_model(case): assert_fused_equivalent(case.model, case.inputs)

One import for users; the parts live in ``assertions`` (the assertion), ``fxrep.equivalence`` (the
comparison), ``generated`` (branched blocks), ``strategies`` (hypothesis) and ``fuzzing`` (random graph
programs), modules of this package.
"""


import torch

from ..equivalence import DEFAULT_RTOL, assert_equivalent, compare_outputs, relative_error
from .assertions import assert_fused_equivalent
from .fuzzing import FUZZ_OPS, GraphSpec, RandomGraphModel, fuzz_check
from .generated import (
    ACTIVATIONS,
    ATTENTION_FORMS,
    ATTENTION_NEAR_MISSES,
    MLP_NEAR_MISSES,
    AttentionSpec,
    Case,
    GeneratedAttentionBlock,
    GeneratedMlpBlock,
    MlpSpec,
    make_inputs,
)
from .strategies import (
    attention_specs,
    branched_attention_blocks,
    branched_mlp_blocks,
    mlp_specs,
    random_graphs,
)

__all__ = [
    "assert_fused_equivalent", "assert_equivalent", "compare_outputs", "relative_error", "DEFAULT_RTOL",
    "graph_code", "Case",
    "branched_mlp_blocks", "branched_attention_blocks", "mlp_specs", "attention_specs", "random_graphs",
    "fuzz_check", "make_inputs", "MlpSpec", "AttentionSpec", "GeneratedMlpBlock", "GeneratedAttentionBlock",
    "GraphSpec", "RandomGraphModel", "FUZZ_OPS", "ACTIVATIONS", "ATTENTION_FORMS", "ATTENTION_NEAR_MISSES",
    "MLP_NEAR_MISSES",
]


def graph_code(model) -> str:
    """The code of a GraphModule, or of a module's trace; used to assert a graph was left alone."""
    return model.code if isinstance(model, torch.fx.GraphModule) else torch.fx.symbolic_trace(model).code
