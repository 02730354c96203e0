"""fxrep's recognition layer: every question a pattern asks about a node, and every node a pattern builds.

- ``targets``: the spelling tables (which callables, methods and modules are which op);
- ``binding``: one argument binder (``bind``), on torch's own signatures;
- ``readers``: typed views of ops (``as_linear``, ``as_layer_norm``, ``activation_key``, ``as_softmax``,
  ``as_sdpa``, ``as_masked_scores``, ``arith_kind``, ``scale_op``, ...); ``attention_op``: fxrep's own
  attention op (``attention_view``);
- ``reductions``: stacks and the sums/means over a stacked axis;
- ``effects``: views, aliasing, in-place writes, layout dependence, guards (``mutation_hazards``);
- ``evaluate``: one constant evaluator;
- ``recorded``: the shapes ``torch.export`` recorded (possibly symbolic), compared provably;
- ``build``: new constants and nodes (``emit_linear``, ``emit_attention``, ``add_constant``).

ATen graphs reach the readers in these spellings: ``fxrep.frontend`` rewrites them first. Patterns import
from ``fxrep.ir`` only; docs/architecture.md says where a new spelling goes.
"""

from .attention_op import AttentionView, attention_view
from .binding import bind
from .build import (
    add_constant,
    bitwise_equal,
    const_node,
    emit_attention,
    emit_linear,
    emit_split_heads,
    fingerprint,
    fresh_attribute_name,
    sdpa_masking,
)
from .effects import (
    is_guard,
    is_inplace,
    is_view,
    layout_sensitive_reader,
    mutation_hazards,
    owns_its_memory,
    write_is_invisible,
)
from .evaluate import evaluate, load_attribute
from .readers import (
    LayerNormView,
    LinearView,
    SdpaView,
    SoftmaxView,
    activation_key,
    arith_kind,
    as_float_cast,
    as_layer_norm,
    as_linear,
    as_masked_scores,
    as_sdpa,
    as_softmax,
    constant_tensor,
    dropout_is_identity,
    einsum_kind,
    fetch_attr,
    is_call,
    is_matmul,
    is_shape_read,
    is_softmax,
    is_timm_function,
    known_shape,
    merge_origins,
    origin,
    scalar_constant,
    scalar_or_channel,
    scale_op,
    shape_source,
)
from .reductions import ReductionView, StackView, as_reduction, as_stack
from .targets import (
    ADD_TARGETS,
    DIV_TARGETS,
    GUARD_TARGETS,
    LAYER_NORM_TARGETS,
    LINEAR_TARGETS,
    MATMUL_TARGETS,
    MUL_TARGETS,
    NEG_TARGETS,
    SDPA_TARGETS,
    SOFTMAX_TARGETS,
    SUB_TARGETS,
    VIEW_FUNCTIONS,
    VIEW_METHODS,
)

# What a pattern author needs (README "Custom patterns"): typed views of the ops, argument binding, the
# builders that emit new weights, and origins for the report. The other names above are fxrep's own: they are
# importable for the built-in patterns but not part of the public API and may change.
__all__ = [
    "bind", "fetch_attr", "known_shape", "merge_origins",
    "as_linear", "as_layer_norm", "as_softmax", "as_sdpa", "attention_view", "activation_key", "arith_kind",
    "LinearView", "LayerNormView", "SoftmaxView", "SdpaView", "AttentionView",
    "emit_linear", "emit_attention", "const_node", "fingerprint",
]
