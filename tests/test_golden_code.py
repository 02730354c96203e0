"""The fused code and weights of fixed models are pinned: a refactor of the engine or the patterns must not change what
``fuse`` emits. After an intended change, regenerate with ``FXREP_UPDATE_GOLDEN=1 pytest
tests/test_golden_code.py`` and review the diff of ``tests/golden/`` in the commit."""

import difflib
import hashlib
import os
from pathlib import Path

import pytest
import timm
import torch

import fxrep
import fxrep.models  # noqa: F401  (registers the branched models with timm)
from fxrep.testing import AttentionSpec, GeneratedAttentionBlock, GeneratedMlpBlock, MlpSpec, make_inputs

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("FXREP_UPDATE_GOLDEN") == "1"


def _registered(name, lam, shapes=True, patterns=None):
    def build():
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=10).eval()
        model.set_join(lam)
        x = (torch.randn(1, 3, 224, 224),)
        return model, x if shapes else None, patterns
    return build


def _readme_batchnorm():
    from test_registry import FoldBatchNormIntoLinear, Head

    model = Head(8, 6, affine=True, bias=True).eval()
    registry = fxrep.default_registry()
    registry.register(FoldBatchNormIntoLinear(), before="merge_affine")
    return model, (torch.randn(4, 8),), registry


def _generated(block, spec):
    def build():
        return block(spec), make_inputs(spec.dim, spec.dtype), None
    return build


CASES = {
    "d6b2_joined": _registered("fxrep_deit_tiny_d6b2", 1.0),
    "d4b3_joined": _registered("fxrep_deit_tiny_d4b3", 1.0),
    "d3b4_joined": _registered("fxrep_deit_tiny_d3b4", 1.0),
    "d3b4_joined_no_shapes": _registered("fxrep_deit_tiny_d3b4", 1.0, shapes=False),
    "d3b4_unjoined": _registered("fxrep_deit_tiny_d3b4", 0.0),
    "d3b4_joined_per_head": _registered("fxrep_deit_tiny_d3b4", 1.0,
                                        patterns=fxrep.default_registry().without("rank_aware_attention")),
    "readme_batchnorm": _readme_batchnorm,
    "mlp_functional_norm_average": _generated(GeneratedMlpBlock, MlpSpec(branches=3, functional_norm=True,
                                                                          average=True)),
    "mlp_widen_shared_norm": _generated(GeneratedMlpBlock, MlpSpec(branches=3, lam=None, norm="shared")),
    "mlp_eps_near_miss": _generated(GeneratedMlpBlock, MlpSpec(branches=3, lam=0.0, near_miss="eps")),
    "attention_einsum_joined": _generated(GeneratedAttentionBlock, AttentionSpec(form="einsum", lam=1.0)),
    "attention_separate_sdpa": _generated(GeneratedAttentionBlock, AttentionSpec(form="separate_sdpa",
                                                                                branches=3)),
    "attention_softmax_module_half_joined": _generated(GeneratedAttentionBlock,
                                                       AttentionSpec(form="softmax_module", lam=0.5)),
}


def _state_digest(gm):
    """One line per parameter and buffer: name, dtype, shape and a hash of its bits (a refactor of the weight
    algebra must give the same bits, not just close values)."""
    lines = []
    for name, t in sorted({**dict(gm.named_parameters()), **dict(gm.named_buffers())}.items()):
        digest = hashlib.sha256(t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
        lines.append(f"# {name} {str(t.dtype).removeprefix('torch.')} {tuple(t.shape)} {digest}\n")
    return "".join(lines)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fused_code_is_unchanged(name):
    model, inputs, patterns = CASES[name]()
    gm = fxrep.fuse(model, example_inputs=inputs, patterns=patterns)
    code = gm.code.strip() + "\n" + _state_digest(gm)
    path = GOLDEN / f"{name}.py.txt"
    if UPDATE or not path.exists():
        assert UPDATE, f"no golden file {path}: run with FXREP_UPDATE_GOLDEN=1 to write it"
        path.write_text(code)
        return
    expected = path.read_text()
    if code != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), code.splitlines(True),
                                            "golden", "now", n=2))
        pytest.fail(f"fused code of {name} changed:\n{diff[:6000]}")
