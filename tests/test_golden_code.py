"""What ``fuse`` emits for fixed models is pinned: a refactor of the engine or the patterns must not change
the fused code, nor the fused weights beyond rounding. After an intended change, regenerate with
``FXREP_UPDATE_GOLDEN=1 pytest tests/test_golden_code.py`` and review the diff of ``tests/golden/``.

Portable across CPUs (docs/numerics.md, "Golden files"): the models' weights are small dyadic numbers drawn
with integer arithmetic (numpy's PCG64), the same bits on every machine, unlike torch's random init whose last
bits depend on the CPU kernel set. fxrep's float64 algebra on them, rounded once to float32, may still
differ by one unit in the last place between machines, so each weight tensor is pinned by three float64
sums (of its values, of their magnitudes, and with fixed weights), compared within the bound that one-ulp
differences and the sums' own rounding allow."""

import difflib
import math
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxrep
import fxrep.models  # noqa: F401  (registers the branched models with timm)
from fxrep.numerics import gamma, ulp
from fxrep.testing import (
    AttentionSpec,
    GeneratedAttentionBlock,
    GeneratedMlpBlock,
    MlpSpec,
    assert_fused_equivalent,
)

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("FXREP_UPDATE_GOLDEN") == "1"


def portable_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replace every parameter of ``model`` and BatchNorm's running statistics (in place, on the test's own
    model) by dyadic values from integer draws: weights of fan-in n in [-1, 1) / 2^round(log2 sqrt n) with 11
    significant bits, tensors that were all ones (norm weights, running variances) 1 + [-1/16, 1/16), the rest
    [-1/4, 1/4). Other buffers (join coefficients, masks) keep their values."""
    rng = np.random.Generator(np.random.PCG64(seed))
    with torch.no_grad():
        for name, t in sorted(model.state_dict(keep_vars=True).items()):
            if not t.is_floating_point() or not (isinstance(t, torch.nn.Parameter)
                                                 or name.endswith("running_mean")
                                                 or name.endswith("running_var")):
                continue
            k = torch.from_numpy(rng.integers(-2 ** 10, 2 ** 10, size=tuple(t.shape))).double() / 2 ** 10
            if t.dim() >= 2:
                values = k * 2.0 ** -round(math.log2(math.sqrt(max(1, t[0].numel()))))
            elif t.numel() and bool((t == 1).all()):
                values = 1 + k / 16
            else:
                values = k / 4
            t.copy_(values.to(t.dtype))
    return model


def portable_inputs(*shape, seed: int = 1) -> tuple:
    rng = np.random.Generator(np.random.PCG64(seed))
    return (torch.from_numpy(rng.integers(-2 ** 10, 2 ** 10, size=shape) / 2 ** 10).float(),)


def _registered(name, lam, shapes=True, patterns=None):
    def build():
        model = portable_(timm.create_model(name, num_classes=10).eval())
        model.set_join(lam)
        return model, portable_inputs(1, 3, 224, 224), shapes, patterns
    return build


def _readme_batchnorm():
    from test_registry import FoldBatchNormIntoLinear, Head

    registry = fxrep.default_registry()
    registry.register(FoldBatchNormIntoLinear(), before="merge_affine")
    return portable_(Head(8, 6, affine=True, bias=True).eval()), portable_inputs(4, 8), True, registry


def _generated(block, spec):
    def build():
        return portable_(block(spec)), portable_inputs(2, 5, spec.dim), True, None
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


# -- weight fingerprints -------------------------------------------------------------------------------------

def _weights(n: int) -> torch.Tensor:
    """Fixed weights in [-2, -1) and [1, 2), dyadic and the same on every machine: two elements that trade
    places, or a sign flip, move the weighted sum."""
    rng = np.random.Generator(np.random.PCG64(12345))
    magnitude = 1 + rng.integers(0, 2 ** 10, size=n) / 2 ** 10
    return torch.from_numpy(magnitude * (rng.integers(0, 2, size=n) * 2 - 1)).double()


def fingerprint(t: torch.Tensor) -> dict:
    """{sum, l1, weighted}: three float64 sums of the tensor's values (plain, of magnitudes, and weighted by
    ``_weights``)."""
    v = t.detach().reshape(-1).double()
    return {"sum": v.sum().item(), "l1": v.abs().sum().item(),
            "weighted": (v * _weights(v.numel())).sum().item()}


def fingerprint_bound(t: torch.Tensor) -> float:
    """How far each sum of ``fingerprint`` may move when every element moves by one unit in the last place of
    its dtype (at most two of this tensor's own, at a binade edge; weights at most 2), plus each machine's
    rounding of the sum."""
    v = t.detach().reshape(-1)
    rounding = 2 * ulp(v).sum().item()
    summing = 2 * gamma(max(1, v.numel()), torch.float64) * v.double().abs().sum().item()
    return 2 * (rounding + summing)


def describe(gm) -> str:
    lines = []
    for name, t in sorted({**dict(gm.named_parameters()), **dict(gm.named_buffers())}.items()):
        stats = " ".join(f"{k}={v!r}" for k, v in fingerprint(t).items()) if t.is_floating_point() else \
            f"values={t.reshape(-1).tolist()!r}"
        lines.append(f"# {name} {str(t.dtype).removeprefix('torch.')} {tuple(t.shape)} {stats}\n")
    return gm.code.strip() + "\n" + "".join(lines)


def _tensor_line(line: str) -> tuple:
    name, dtype, rest = line[2:].split(" ", 2)
    shape, _, stats = rest.partition(") ")
    return name, dtype, shape + ")", stats


def mismatches(expected: str, gm) -> list[str]:
    """What differs between a golden file and ``gm``: code lines, tensor names, dtypes, shapes, or a
    fingerprint outside its bound."""
    now = describe(gm)
    code_then = [x for x in expected.splitlines() if not x.startswith("# ")]
    code_now = [x for x in now.splitlines() if not x.startswith("# ")]
    if code_then != code_now:
        return ["".join(difflib.unified_diff([x + "\n" for x in code_then], [x + "\n" for x in code_now],
                                             "golden", "now", n=2))[:6000]]
    tensors = {**dict(gm.named_parameters()), **dict(gm.named_buffers())}
    then = [_tensor_line(x) for x in expected.splitlines() if x.startswith("# ")]
    if [(n, d, s) for n, d, s, _ in then] != [_tensor_line(x)[:3]
                                              for x in now.splitlines() if x.startswith("# ")]:
        return ["the fused model's tensors (names, dtypes or shapes) changed"]
    out = []
    for name, _, _, stats in then:
        t = tensors[name]
        if not t.is_floating_point():
            if stats != f"values={t.reshape(-1).tolist()!r}":
                out.append(f"{name}: {stats}")
            continue
        bound, got = fingerprint_bound(t), fingerprint(t)
        for item in stats.split():
            key, value = item.split("=")
            if abs(got[key] - float(value)) > bound:
                out.append(f"{name}: {key} {got[key]!r} vs golden {value} (bound {bound:.3g})")
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_fused_code_and_weights_are_unchanged(name):
    model, inputs, shapes, patterns = CASES[name]()
    gm = fxrep.fuse(model, example_inputs=inputs if shapes else None, patterns=patterns)
    path = GOLDEN / f"{name}.py.txt"
    if UPDATE or not path.exists():
        assert UPDATE, f"no golden file {path}: run with FXREP_UPDATE_GOLDEN=1 to write it"
        path.write_text(describe(gm))
        return
    problems = mismatches(path.read_text(), gm)
    assert not problems, f"fused {name} changed:\n" + "\n".join(problems)
    assert_fused_equivalent(model, inputs, fused=gm)


@settings(max_examples=30, deadline=None)
@given(shape=st.sampled_from([(7,), (3, 5), (64, 48)]), seed=st.integers(0, 2 ** 16),
       change=st.sampled_from(["swap", "scale", "sign", "one"]))
def test_fingerprints_tolerate_rounding_and_catch_changes(shape, seed, change):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g)
    stats, bound = fingerprint(t), fingerprint_bound(t)
    rounded = torch.nextafter(t, torch.where(torch.rand(shape, generator=g) < 0.5, -torch.inf, torch.inf))
    assert all(abs(fingerprint(rounded)[k] - stats[k]) <= bound for k in stats)  # one ulp anywhere: passes
    wrong = t.clone().reshape(-1)
    if change == "swap":  # two elements trade places
        i, j = wrong.abs().argmax().item(), wrong.abs().argmin().item()
        wrong[i], wrong[j] = wrong[j].clone(), wrong[i].clone()
    elif change == "scale":
        wrong *= 1 + 2.0 ** -10
    elif change == "sign":
        wrong[wrong.abs().argmax()] *= -1
    else:  # one element off by 1% of the largest
        wrong[0] += 0.01 * wrong.abs().max()
    assert any(abs(fingerprint(wrong)[k] - stats[k]) > bound for k in stats)
