"""Hypothesis strategies that draw branched blocks (``fxrep.testing.generated``) and random graph programs
(``fxrep.testing.fuzzing``), each as a ``Case`` of a model in eval mode and inputs for it."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from .fuzzing import FUZZ_OPS, GraphSpec, RandomGraphModel
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


def _lam_values():
    return st.one_of(st.just(1.0), st.just(0.0), st.none(), st.floats(0.05, 0.95))


def mlp_specs(branches=None, near_miss: bool | None = False, dtypes=(torch.float32, torch.float64)):
    """Hypothesis strategy of MlpSpec: 1-6 branches, widths, bias, norm placement and form, LayerScale,
    activations, dtypes, lam (1, 0, None for a plain sum, or in (0, 1)); with ``near_miss=True`` one of
    MLP_NEAR_MISSES (different eps / activation / input, an intermediate read outside, a shared Linear)."""
    misses = st.sampled_from(MLP_NEAR_MISSES) if near_miss else st.none()
    if near_miss is None:
        misses = st.one_of(st.none(), st.sampled_from(MLP_NEAR_MISSES))
    return st.builds(
        MlpSpec,
        dim=st.integers(2, 24), hidden=st.integers(1, 40),
        branches=branches if branches is not None else st.integers(1 if not near_miss else 2, 6),
        bias=st.booleans(), norm=st.sampled_from(["per_branch", "shared", "none"]),
        functional_norm=st.booleans(), layerscale=st.booleans(),
        activation=st.sampled_from(sorted(ACTIVATIONS)),
        lam=_lam_values(), average=st.booleans(), dtype=st.sampled_from(dtypes), near_miss=misses,
        seed=st.integers(0, 2**16),
    )


@st.composite
def branched_mlp_blocks(draw, **kwargs) -> Case:
    """A ``Case`` with a GeneratedMlpBlock built from ``mlp_specs(**kwargs)`` and inputs for it."""
    spec = draw(mlp_specs(**kwargs))
    if spec.near_miss == "eps" and spec.norm != "per_branch":
        spec.norm = "per_branch"
    model = GeneratedMlpBlock(spec)
    return Case(model, make_inputs(spec.dim, spec.dtype, spec.seed), {"spec": spec})


def attention_specs(branches=None, near_miss: bool | None = False, dtypes=(torch.float32, torch.float64)):
    """Hypothesis strategy of AttentionSpec over heads, head dims, branches 1-6, all ATTENTION_FORMS, bias,
    norm placement, LayerScale, lam, a shared mask, dtypes, with or without output projections;
    ``near_miss=True`` draws one of
    ATTENTION_NEAR_MISSES."""
    misses = st.sampled_from(ATTENTION_NEAR_MISSES) if near_miss else st.none()
    return st.builds(
        AttentionSpec,
        dim=st.integers(2, 16), heads=st.integers(1, 4), head_dim=st.integers(1, 8),
        branches=branches if branches is not None else st.integers(1 if not near_miss else 2, 6),
        form=st.sampled_from(ATTENTION_FORMS), bias=st.booleans(),
        norm=st.sampled_from(["per_branch", "shared"]),
        layerscale=st.booleans(), lam=_lam_values(), mask=st.booleans(), dtype=st.sampled_from(dtypes),
        projection=st.sampled_from([True, True, False]), near_miss=misses, seed=st.integers(0, 2**16),
    )


@st.composite
def branched_attention_blocks(draw, **kwargs) -> Case:
    """A ``Case`` with a GeneratedAttentionBlock built from ``attention_specs(**kwargs)`` (5 tokens)."""
    spec = draw(attention_specs(**kwargs))
    if spec.near_miss == "causal":
        spec.lam = None    # causal joins have no explicit-softmax spelling here
        spec.mask = False  # SDPA takes a mask or is_causal, not both
    if spec.near_miss == "qk_norm" and not spec.form.startswith("timm"):
        spec.form = "timm_sdpa"
    if spec.near_miss == "qk_norm":
        spec.projection = True  # q/k norms are timm's, whose Attention always projects
    if not spec.projection:  # heads as wide as the stream (vit-pytorch with heads * dim_head == dim)
        spec.form = "separate_sdpa" if spec.form.startswith("timm") else spec.form
        spec.dim = spec.heads * spec.head_dim
    model = GeneratedAttentionBlock(spec)
    return Case(model, make_inputs(spec.dim, spec.dtype, spec.seed), {"spec": spec})


# ----------------------------------------------------------------------------------------------------------
# Random, mostly non-conforming graphs for differential fuzzing: fuse must raise a documented FxrepError or
# return a model that computes the same function, and must leave the input model unchanged.
# ----------------------------------------------------------------------------------------------------------


@st.composite
def random_graphs(draw, max_steps: int = 10, dtypes=(torch.float32, torch.float64, torch.bfloat16)) -> Case:
    """A ``Case`` with a RandomGraphModel: DAGs of Linear (some shared), LayerNorm (module and functional,
    mixed eps), activations, adds, constant and parameter scales, MLPs, timm attention (SDPA or explicit),
    masked attention and reshapes; layout readers after contiguous (view, as_strided), in-place writes into
    values read elsewhere, in-place activation modules and a module that caches values while it runs; values
    with several users; float32/float64/bfloat16."""
    n = draw(st.integers(1, max_steps))
    steps = []
    for i in range(n):
        op = draw(st.sampled_from(FUZZ_OPS))
        steps.append((op, (draw(st.integers(0, i)), draw(st.integers(0, i))), draw(st.integers(0, 11))))
    spec = GraphSpec(dim=draw(st.sampled_from([2, 4, 6, 8])), steps=steps,
                     outputs=draw(st.lists(st.integers(0, n), max_size=3)), tuple_output=draw(st.booleans()),
                     dtype=draw(st.sampled_from(dtypes)), seed=draw(st.integers(0, 2**16)))
    model = RandomGraphModel(spec)
    return Case(model, make_inputs(spec.dim, spec.dtype, spec.seed, tokens=3), {"spec": spec})
