"""Any device: fxrep fuses a CPU twin of the traced graph (float64 algebra on the CPU) and moves the fused
model to the input's device with the input's dtypes. The logic is tested on the CPU; the GPU test runs where
a GPU is available and is skipped otherwise."""

import pytest
import torch
import torch.nn as nn

import fxrep
from fxrep.devices import cpu_twin, model_device
from fxrep.snapshot import ModelSnapshot
from fxrep.testing import GeneratedMlpBlock, MlpSpec, assert_fused_equivalent, make_inputs


class WithConstants(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = GeneratedMlpBlock(MlpSpec(branches=3, lam=1.0))
        self.shared = self.block.norms[0].weight          # one parameter under two names
        self.table = torch.randn(8)                        # a plain tensor attribute (traced as a constant)

    def forward(self, x):
        return self.block(x) * self.shared + self.table


def test_model_device_is_the_one_device_or_a_clear_error():
    assert model_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert model_device(nn.ReLU()) == torch.device("cpu")
    mixed = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2, device="meta"))
    with pytest.raises(fxrep.UnsupportedModelError,
                       match=r"several devices \(cpu, meta\).*model.to\(device\)"):
        model_device(mixed)


def test_the_cpu_twin_copies_every_tensor_and_keeps_sharing():
    model = WithConstants().eval()
    gm = fxrep.trace(model)
    snapshot = ModelSnapshot(gm)
    twin = cpu_twin(gm)
    originals = {id(t) for t in list(gm.parameters()) + list(gm.buffers())}
    assert not originals & {id(t) for t in list(twin.parameters()) + list(twin.buffers())}
    for (name, a), (_, b) in zip(gm.state_dict(keep_vars=True).items(),
                                 twin.state_dict(keep_vars=True).items()):
        assert torch.equal(a, b) and a.dtype == b.dtype, name
    assert any(k.startswith("_tensor_constant") for k, _ in twin.named_buffers())  # self.table, copied too
    x = make_inputs(8, torch.float32)
    torch.testing.assert_close(twin(*x), gm(*x), rtol=0, atol=0)
    assert snapshot.diff(gm) == ""


def test_fusing_the_twin_is_exact():
    model = WithConstants().eval()
    twin = cpu_twin(fxrep.trace(model))
    fused = assert_fused_equivalent(twin, make_inputs(8, torch.float32))
    assert fused.meta["fxrep_report"].after["activation"] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU on this machine")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_model_on_the_gpu_fuses_and_stays_there(dtype):
    model = WithConstants().to("cuda", dtype).eval()
    x = tuple(t.to("cuda", dtype) for t in make_inputs(8, torch.float32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fxrep.fuse(model, example_inputs=x, check=True)
    assert {t.device.type for t in list(fused.parameters()) + list(fused.buffers())} == {"cuda"}
    assert {t.dtype for t in fused.parameters()} == {dtype}
    assert all(torch.equal(v, before[k]) and v.device.type == "cuda" for k, v in model.state_dict().items())


class WithRecurrence(nn.Module):
    """An LSTM is a leaf of the traced graph: the fused model shares the user's module."""

    def __init__(self):
        super().__init__()
        self.block = GeneratedMlpBlock(MlpSpec(branches=2, lam=1.0))
        self.rnn = nn.LSTM(8, 4, batch_first=True)

    def forward(self, x):
        return self.rnn(self.block(x))[0]


def test_fusing_on_the_cpu_does_not_touch_a_shared_rnn():
    # Module.to on the fused model re-flattened the user's LSTM weights (new _flat_weight_refs): found on
    # timm's sequencer2d_s by benchmarks/zoo.py
    torch.manual_seed(0)
    model = WithRecurrence().eval()
    refs = list(model.rnn._flat_weight_refs)
    fused = assert_fused_equivalent(model, make_inputs(8, torch.float32))
    assert model.rnn._flat_weight_refs == refs
    assert fused.meta["fxrep_report"].after["activation"] == 1
