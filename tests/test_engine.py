"""The fuse API: report, non-mutation, errors that name the fix, idempotence, determinism, save/load."""

import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

import fxrep
from fxrep.engine import run_frontend
from fxrep.models.registry import _create
from fxrep.snapshot import ModelSnapshot
from fxrep.stats import count_flops
from fxrep.testing import GeneratedMlpBlock, MlpSpec, assert_fused_equivalent, make_inputs


def _block(**kw):
    return GeneratedMlpBlock(MlpSpec(dim=8, hidden=16, branches=3, **kw))


def test_returns_a_new_graph_module_with_a_readable_report():
    model = _block(lam=1.0)
    x = make_inputs(8, torch.float32)
    gm = fxrep.fuse(model, example_inputs=x, check=True)
    assert isinstance(gm, torch.fx.GraphModule)
    report = gm.meta["fxrep_report"]
    assert report.count("merge_affine") >= 1
    text = str(report)
    assert "merge_affine" in text and "before" in text and "flops" in text
    assert report.before["activation"] == 3 and report.after["activation"] == 1
    assert report.after["flops"] < report.before["flops"]
    merged = [a for a in report.applied if a.pattern == "merge_affine"][0]
    assert any(o.startswith("fc1.") for o in merged.origins), merged.origins


def test_training_mode_is_rejected_with_the_fix():
    model = _block().train()
    with pytest.raises(fxrep.TrainingModeError, match=r"model\.eval\(\)"):
        fxrep.fuse(model)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4), Branchy())

    def forward(self, x):
        return self.inner(x)


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


def test_untraceable_model_names_the_module_and_the_fix():
    with pytest.raises(fxrep.TraceError, match=r"(?s)inner\.1.*torch.export.*example_inputs=\(x,\)"):
        fxrep.fuse(DataDependent().eval())
    with pytest.raises(fxrep.TraceError, match=r"(?s)inner\.1.*test_engine.py:\d+: if x.sum\(\) > 0:"):
        fxrep.fuse(DataDependent().eval(), example_inputs=(torch.randn(2, 4),))  # data-dependent for both


def test_meta_device_model_is_rejected():
    with torch.device("meta"):
        model = nn.Linear(4, 4)
    with pytest.raises(fxrep.UnsupportedModelError, match="meta device"):
        fxrep.fuse(model.eval())


def test_integer_parameters_are_rejected():
    model = nn.Linear(4, 4).eval()
    model.weight = nn.Parameter(torch.ones(4, 4, dtype=torch.int32), requires_grad=False)
    with pytest.raises(fxrep.UnsupportedModelError, match="dtype torch.int32"):
        fxrep.fuse(model)


def test_quantized_models_are_rejected():
    model = nn.Sequential(torch.ao.nn.quantized.Linear(4, 4)).eval()
    with pytest.raises(fxrep.UnsupportedModelError, match="quantiz"):
        fxrep.fuse(model)


def test_wrong_example_input_shape_gets_a_clear_error():
    with pytest.raises(fxrep.InputError, match="example inputs"):
        fxrep.fuse(_block(), example_inputs=(torch.randn(2, 5, 7),), check=True)


def test_check_without_inputs_says_what_is_missing():
    with pytest.raises(fxrep.InputError, match="example_inputs"):
        fxrep.fuse(_block(), check=True)


def test_not_a_module_is_rejected():
    with pytest.raises(fxrep.FxrepError, match="nn.Module"):
        fxrep.fuse(lambda x: x)


def test_fusing_twice_changes_nothing_more():
    x = make_inputs(8, torch.float32)
    once = fxrep.fuse(_block(lam=0.5), example_inputs=x)
    twice = fxrep.fuse(once, example_inputs=x)
    assert twice.meta["fxrep_report"].applied == []
    assert twice.code == once.code


def test_fuse_is_deterministic():
    model = _block(lam=1.0)
    a, b = fxrep.fuse(model), fxrep.fuse(model)
    assert a.code == b.code
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_fused_models_survive_deepcopy_and_save_load():
    x = make_inputs(8, torch.float32)
    gm = fxrep.fuse(_block(lam=1.0), example_inputs=x)
    want = gm(*x)
    assert torch.equal(copy.deepcopy(gm)(*x), want)
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded(*x), want)


class WithBuffers(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("pos", torch.randn(1, 5, 8))
        self.register_buffer("table", torch.randn(3, 8).half())
        self.cls = nn.Parameter(torch.randn(1, 1, 8, dtype=torch.float64))
        self.block = _block(lam=1.0)

    def forward(self, x):
        return self.block(x + self.pos), self.cls, self.table


def test_buffers_keep_their_values_and_dtypes():
    model = WithBuffers().eval()
    gm = assert_fused_equivalent(model, make_inputs(8, torch.float32))
    tensors = dict(gm.named_buffers()) | dict(gm.named_parameters())
    for name in ("pos", "table", "cls"):
        kept = [t for n, t in tensors.items() if n.endswith(name)]
        assert len(kept) == 1 and kept[0].dtype == getattr(model, name).dtype
        assert torch.equal(kept[0], getattr(model, name))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_fold_in_float64(dtype):
    # a LayerScale of 1e-5 underflows when folded in fp16; fxrep folds in float64 and casts once
    model = GeneratedMlpBlock(MlpSpec(dim=16, hidden=32, branches=2, lam=1.0, layerscale=True))
    with torch.no_grad():
        for g in model.gammas:
            g.fill_(1e-5)
    model = model.to(dtype)
    x = tuple(t.to(dtype) for t in make_inputs(16, torch.float32))
    assert_fused_equivalent(model, x)


def test_check_generates_inputs_from_traced_shapes():
    from torch.fx.passes.shape_prop import ShapeProp

    traced = torch.fx.symbolic_trace(_block(lam=1.0))
    ShapeProp(traced).propagate(*make_inputs(8, torch.float32))
    fused = fxrep.fuse(traced.eval(), check=True)
    assert fused.meta["fxrep_report"].after["activation"] == 1


def test_regression_single_branch_without_bias_reaches_a_fixed_point():
    # found by hypothesis: a zero scalar bias was emitted as `+ 0.0` and re-merged forever
    model = GeneratedMlpBlock(MlpSpec(dim=2, hidden=1, branches=1, bias=False, layerscale=False, lam=1.0))
    assert_fused_equivalent(model, make_inputs(2, torch.float32))


def test_tracing_leaves_no_constants_on_the_users_model():
    # fx stows tensors made during tracing, here (1 - lam), as attributes of the traced root
    model = _create("fxrep_deit_tiny_d12b1", branches=2, depth=1, embed_dim=16, num_heads=2, num_classes=3,
                    img_size=16, patch_size=8).eval()
    before = {name: set(vars(m)) for name, m in model.named_modules()}
    gm = fxrep.trace(model)
    assert {name: set(vars(m)) for name, m in model.named_modules()} == before
    assert any(n.op == "get_attr" and "_tensor_constant" in n.target for n in gm.graph.nodes)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


class _Unpacks(nn.Module):
    def forward(self, x):
        B, N, C = x.shape  # noqa: N806 - the names timm uses
        q, k, v = x.reshape(B, N, 3, C // 3).permute(2, 0, 1, 3).unbind(0)
        first, second = x.unbind(1)[:2]
        return (q @ k.transpose(-2, -1)).softmax(-1) @ v + first[:, None, :C // 3] * second[:, None, -1:]


def test_tracing_unpacks_like_fx():
    """fxrep's tracer looks tuple unpacking up in a table instead of disassembling on every unpack: the same
    graph as fx's, and the same error for iterating a proxy of unknown length."""
    for model in (_Unpacks(), _create("fxrep_deit_tiny_d12b1", branches=2, depth=2, embed_dim=16, num_heads=2,
                                      num_classes=3, img_size=16, patch_size=8).eval()):
        concrete = {"attn_mask": None, "is_causal": False} if not isinstance(model, _Unpacks) else None
        got = fxrep.trace(model)  # first: fx's tracer leaves its constants on the model, fxrep's does not
        want = fx.GraphModule(model, fx.Tracer().trace(model, concrete_args=concrete))
        run_frontend(want, concrete, aten=False)  # fx's guards of fixed arguments, as fxrep writes them
        want.recompile()
        assert str(got.graph) == str(want.graph)

    class Loops(nn.Module):
        def forward(self, x):
            return sum(t for t in x)

    with pytest.raises(fxrep.TraceError, match="Loops"):
        fxrep.trace(Loops())


def test_fusing_a_fused_graph_module_leaves_the_input_unchanged():
    """The input GraphModule's meta (fxrep's constant table and report included), parameters and code stay
    exactly as they were when it is fused again."""
    x = make_inputs(8, torch.float32)
    once = fxrep.fuse(_block(lam=0.5), example_inputs=x)
    meta_before = copy.deepcopy(once.meta)
    report = once.meta["fxrep_report"]
    snapshot, code = ModelSnapshot(once), once.code
    fxrep.fuse(once, example_inputs=x)
    assert once.meta.keys() == meta_before.keys()
    assert once.meta["fxrep_constants"] == meta_before["fxrep_constants"]
    assert once.meta["fxrep_report"] is report and str(report) == str(meta_before["fxrep_report"])
    assert snapshot.diff(once) == "" and once.code == code


def test_a_pattern_that_erases_nodes_is_told_to_use_replace_node():
    def replace(match, ctx):
        ctx.graph.erase_node(match.nodes[0])

    eraser = fxrep.FunctionPattern("eraser", lambda n, c: fxrep.Match([n]) if n.op == "call_module" else None,
                                   replace)
    with pytest.raises(fxrep.PatternError, match="must not erase nodes: call ctx.replace_node"):
        fxrep.fuse(_block(lam=0.5), patterns=[eraser])


class _Sdpa(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


def test_attention_flops_are_counted_on_the_cpu():
    """torch's FlopCounterMode has no formula for the CPU attention kernel; fxrep's counter adds it (two
    products of 2 * (batch * heads) * 5 * 5 * 4 FLOPs each)."""
    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    assert count_flops(_Sdpa(), (q, k, v)) == 2 * (2 * 6 * 5 * 5 * 4)
