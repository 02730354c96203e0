"""fxrep's recognition layer: every question a pattern asks about a node, and every node a pattern builds.

- ``opspec``, ``known_ops``: one ``OpSpec`` per op fxrep understands, its spellings and properties;
- ``targets``: the readers' tables (which callables, methods and modules are which op), from the specs;
- ``binding``: one argument binder (``bind``, ``input_of``), on torch's own signatures;
- ``readers``: typed views of ops (``as_linear``, ``as_layer_norm``, ``activation_key``, ``as_softmax``,
  ``as_sdpa``, ``as_masked_scores``, ``arith_kind``, ``scale_op``, ...); ``products``: matmul and einsum
  with their operands; ``attention_op``: fxrep's own attention op (``attention_view``);
- ``reductions``: stacks and the sums/means over a stacked axis;
- ``effects``: views, aliasing, in-place writes, layout dependence, guards (``mutation_hazards``);
- ``evaluate``: one constant evaluator;
- ``recorded``: the shapes ``torch.export`` recorded (possibly symbolic), compared provably;
- ``build``: new constants and nodes (``emit_linear``, ``emit_attention``, ``add_constant``).

ATen graphs reach the readers in these spellings: ``fxrep.frontend`` rewrites them first. Patterns import
from ``fxrep.ir`` only; docs/architecture.md says where a new spelling goes.
"""

# What a pattern author needs (README "Custom patterns"): typed views of the ops, argument binding, the
# builders that emit new weights, and origins for the report. fxrep's own patterns import the rest from the
# submodules (``fxrep.ir.readers``, ``fxrep.ir.effects``, ...): those names are not public and may change.
from .attention_op import AttentionView, attention_view
from .binding import bind
from .build import const_node, emit_attention, emit_linear, fingerprint
from .readers import (
    LayerNormView,
    LinearView,
    SdpaView,
    SoftmaxView,
    activation_key,
    arith_kind,
    as_layer_norm,
    as_linear,
    as_sdpa,
    as_softmax,
    fetch_attr,
    input_of,
    known_shape,
    merge_origins,
)

__all__ = [
    "bind", "input_of", "fetch_attr", "known_shape", "merge_origins",
    "as_linear", "as_layer_norm", "as_softmax", "as_sdpa", "attention_view", "activation_key", "arith_kind",
    "LinearView", "LayerNormView", "SoftmaxView", "SdpaView", "AttentionView",
    "emit_linear", "emit_attention", "const_node", "fingerprint",
]
