"""A CI-sized slice of the model zoo (benchmarks/zoo.py runs all of it): every model that once came back
broken, changed or stuck, and a few that always passed. Random weights, default input size, batch 1, both fx
flows (fxrep.fuse(model) and fxrep.fuse(torch.fx.symbolic_trace(model))), and the exported flow
(fxrep.fuse(torch.export.export(model, (x,)))) for the models that failed there. Each must fuse exactly and
leave the model as it was, every attribute included."""

import pytest
import torch

from benchmarks.zoo_harness import build, try_fuse

SLICE = [
    # fused graphs that raised (contiguous() dropped before a view)
    ("timm", "swin_tiny_patch4_window7_224"), ("timm", "swinv2_tiny_window16_256"),
    ("timm", "swinv2_cr_tiny_224"),
    ("timm", "davit_tiny"), ("timm", "gcvit_xtiny"), ("timm", "sam2_hiera_tiny"), ("timm", "tresnet_m"),
    ("torchvision", "shufflenet_v2_x0_5"),
    # the user's model was changed (a Proxy left in attention_bias_cache)
    ("timm", "levit_128s"), ("timm", "efficientformer_l1"), ("timm", "efficientformerv2_s0"),
    # a phase that never reached its fixed point
    ("timm", "coat_tiny"),
    # a fused graph that raised (a 4-d input whose window rows and columns the attention folds into tokens,
    # lifted as if it were (batch, tokens, dim)), and an LSTM re-flattened by Module.to on the user's module
    ("timm", "maxvit_pico_rw_256"), ("timm", "sequencer2d_s"),
    # always passed
    ("timm", "deit_tiny_patch16_224"), ("torchvision", "resnet18"),
]


@pytest.mark.parametrize("source,name", SLICE, ids=[n for _, n in SLICE])
def test_zoo_model_fuses_exactly_in_both_flows(source, name):
    torch.manual_seed(0)
    model, x = build(source, name)
    for flow in ("module", "traced"):
        result = try_fuse(model, x, flow)
        allowed = ("exact", "untraceable") if flow == "traced" else ("exact",)
        assert result.outcome in allowed, f"{name} ({flow}): {result.outcome}: {result.detail}"


EXPORTED_SLICE = [
    # ATen slices with negative ends were read as narrow() of a negative length (the graph did not run)
    ("torchvision", "swin_t"),
    # timm's weight standardization is batch_norm(training=True) without running statistics: not training
    ("timm", "test_nfnet"),
    # fx cannot trace it (data-dependent control flow); export can
    ("timm", "convit_tiny"),
]


@pytest.mark.parametrize("source,name", EXPORTED_SLICE, ids=[n for _, n in EXPORTED_SLICE])
def test_zoo_model_fuses_exactly_when_exported(source, name):
    torch.manual_seed(0)
    model, x = build(source, name)
    result = try_fuse(model, x, "exported")
    assert result.outcome == "exact", f"{name} (exported): {result.outcome}: {result.detail}"
    assert result.rewrites > 0
