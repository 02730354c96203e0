"""Models written by others as a reliability suite: fuse each, run it, compare, and check the original.

``benchmarks/zoo.py`` runs every timm model module and torchvision classification model through
``try_fuse``; ``tests/test_zoo.py`` runs a CI-sized slice. One outcome per (model, flow):

- ``exact``: fused, runs, matches the original within the dtype tolerance, original unchanged;
- ``error``: a documented ``FxrepError`` (its class is recorded), the original unchanged;
- ``broken``: the fused model raises when run;
- ``wrong``: the fused model's output differs;
- ``mutated``: fusing changed the user's model (a parameter, buffer or any attribute, caches included);
- ``fixed_point``: a phase did not reach a fixed point (patterns undoing each other);
- ``internal``: fxrep caught its own broken graph (``InternalError``) and did not return it;
- ``raw``: ``fuse`` raised something that is not an FxrepError (a stack trace from deep inside torch).

Flows: ``module`` (``fxrep.fuse(model)``) and ``traced`` (``fxrep.fuse(torch.fx.symbolic_trace(model))``,
only where plain torch.fx traces the model; ``untraceable`` otherwise).
"""

from __future__ import annotations

import re
import time
import traceback
from dataclasses import dataclass

import torch
from torch import fx, nn

from fxrep.equivalence import DEFAULT_RTOL, flat_tensors, relative_error
from fxrep.errors import FxrepError, InternalError
from fxrep.snapshot import ModelSnapshot, preserved

OUTCOMES = ("exact", "error", "broken", "wrong", "mutated", "fixed_point", "internal", "raw")
BAD_OUTCOMES = ("broken", "wrong", "mutated", "fixed_point", "internal", "raw")

# Smallest first: the size words timm and torchvision use in model names.
_SIZE_WORDS = ["atto", "femto", "pico", "nano", "xxxs", "xxs", "xs", "micro", "mini", "tiny", "t", "s0",
               "small", "s", "m0", "medium", "m", "base", "b", "large", "l", "huge", "h", "giant", "g"]


@dataclass
class ZooResult:
    source: str
    model: str
    flow: str
    outcome: str
    detail: str = ""
    params: int = 0
    seconds: float = 0.0
    rewrites: int = 0

    def row(self) -> dict:
        return {"source": self.source, "model": self.model, "flow": self.flow, "outcome": self.outcome,
                "detail": self.detail, "params": self.params, "seconds": round(self.seconds, 2),
                "rewrites": self.rewrites}


def _size_rank(name: str) -> tuple:
    words = re.split(r"[_\-.]", name.lower())
    ranks = [_SIZE_WORDS.index(w) for w in words if w in _SIZE_WORDS]
    numbers = [int(n) for n in re.findall(r"\d+", name)]
    return (min(ranks) if ranks else len(_SIZE_WORDS), sum(numbers), len(name), name)


def count_params(build) -> int:
    """Parameter count of ``build()``: built on the meta device (no memory, no init) where the constructor
    allows it, else on the CPU (torchvision's RegNets compute their widths from real tensors)."""
    try:
        with torch.device("meta"):
            m = build()
    except Exception:  # noqa: BLE001 - a constructor that touches data: build it for real
        m = build()
    return sum(p.numel() for p in m.parameters())


def timm_zoo(max_params: float = 60e6, candidates: int = 4) -> list[tuple[str, str, int]]:
    """(module, model name, params) for the smallest model of every timm model module under ``max_params``:
    the ``candidates`` smallest names by size word are built on the meta device and the smallest is kept."""
    import timm

    out = []
    for module in timm.list_modules():
        names = sorted(timm.list_models(module=module), key=_size_rank)[:candidates]
        if not names:
            continue
        params, name = min((count_params(lambda n=n: timm.create_model(n, pretrained=False)), n)
                           for n in names)
        out.append((module, name, params))
    return [t for t in out if t[2] <= max_params]


def torchvision_zoo(max_params: float = 60e6) -> list[tuple[str, str, int]]:
    """(family, model name, params) for every torchvision classification model under ``max_params``."""
    import torchvision

    out = []
    for name in torchvision.models.list_models(module=torchvision.models):
        params = count_params(lambda n=name: torchvision.models.get_model(n, weights=None))
        if params <= max_params:
            out.append((re.sub(r"[\d_].*$", "", name), name, params))
    return out


# Hugging Face: every image classification model type transformers maps, built from its default config
# with the sizes below where the config has them (random weights, nothing downloaded). Left out: types that
# need weights or packages from elsewhere (timm_wrapper: a hub checkpoint; dinat: natten), multimodal
# classifiers, and imagegpt (token ids, not pixels).
_HF_SKIP = {"timm_wrapper", "dinat", "shieldgemma2", "imagegpt", "perceiver", "clip", "siglip", "siglip2",
            "metaclip_2"}
_HF_SMALL = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
             "image_size": 64, "embed_dim": 32, "patch_size": 16}


def huggingface_zoo() -> list[tuple[str, str, int]]:
    """(model type, model type, 0) for every Hugging Face image classification model type fxrep tries."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    return [(t, t, 0) for t in sorted(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES) if t not in _HF_SKIP]


def _huggingface(model_type: str) -> tuple[nn.Module, tuple]:
    """The model from its default config shrunk by ``_HF_SMALL`` where that gives a model that runs; else
    with only fewer layers; else as configured."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    names = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES[model_type]
    model_class = getattr(transformers, names if isinstance(names, str) else names[0])
    error = None
    for overrides in (_HF_SMALL, {"num_hidden_layers": 2}, {}):
        config = transformers.AutoConfig.for_model(model_type)
        for key, value in overrides.items():
            if isinstance(getattr(config, key, None), int):
                setattr(config, key, value)
        config.num_labels = 5
        size = getattr(config, "image_size", 224)
        size = (3, size, size) if isinstance(size, int) else (3, *size[:2])
        try:
            model = model_class(config).eval()
            with torch.no_grad():
                model(torch.randn(1, *size))
            return model, size
        except Exception as e:  # noqa: BLE001 - these sizes do not fit this model type: try the next
            error = e
    raise error


def build(source: str, name: str) -> tuple[nn.Module, torch.Tensor]:
    """The model with random weights, in eval mode, and a batch-1 input of its default size."""
    torch.manual_seed(0)
    if source == "huggingface":
        model, size = _huggingface(name)
    elif source == "timm":
        import timm

        model = timm.create_model(name, pretrained=False)
        size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    else:
        import torchvision

        model = torchvision.models.get_model(name, weights=None)
        size = (3, 299, 299) if name == "inception_v3" else (3, 224, 224)
    model.eval()
    x = torch.randn(1, *size, generator=torch.Generator().manual_seed(1))
    return model, x


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def try_fuse(model: nn.Module, x: torch.Tensor, flow: str = "module", patterns=None,
             check_traced_again: bool = True) -> ZooResult:
    """Fuse ``model`` as a new user would (``flow``: 'module', 'traced' with plain torch.fx, or 'exported'
    with torch.export) and classify what happened.

    The original is run first for the reference output; its parameters, buffers and every module attribute
    (caches and other containers included) are fingerprinted before and compared after. With
    ``check_traced_again`` the original must still trace with plain torch.fx after fusing if it did before
    (a tracer that leaves Proxies behind in a cache breaks exactly that)."""
    from fxrep import fuse

    result = ZooResult("", "", flow, "exact", params=sum(p.numel() for p in model.parameters()))
    with torch.no_grad():
        expected = flat_tensors(model(x))
    subject = model
    if flow in ("traced", "exported"):
        try:
            subject = fx.symbolic_trace(model) if flow == "traced" else torch.export.export(model, (x,))
        except Exception as e:  # noqa: BLE001 - torch.fx / torch.export cannot capture it: not fxrep's business
            result.outcome, result.detail = "untraceable", _short(e)
            return result
    # an ExportedProgram: the model it came from (its state is shared) and the program's own graph
    before = ModelSnapshot(model if flow == "exported" else subject)
    program_code = subject.graph_module.code if flow == "exported" else None
    start = time.perf_counter()
    try:
        fused = fuse(subject, example_inputs=(x,), patterns=patterns)
    except FxrepError as e:
        result.seconds = time.perf_counter() - start
        result.outcome = "fixed_point" if "fixed point" in str(e) else \
            "internal" if isinstance(e, InternalError) else "error"
        result.detail = _short(e)
    except Exception as e:  # noqa: BLE001 - that is what this harness measures
        result.seconds = time.perf_counter() - start
        result.outcome, result.detail = "raw", _short(e) + " | " + _last_frame(e)
    else:
        result.seconds = time.perf_counter() - start
        if flow == "exported":
            fused = _unlifted(fused)
        result.rewrites = len(fused.meta["fxrep_report"].applied)
        _compare(fused, x, expected, result)
    changed = before.diff(model if flow == "exported" else subject)
    if program_code is not None and subject.graph_module.code != program_code:
        changed = "the ExportedProgram's graph changed"
    if changed:
        result.outcome, result.detail = "mutated", changed
    elif check_traced_again and flow == "module" and result.outcome in ("exact", "error"):
        _check_still_traceable(model, x, result)
    return result


def _unlifted(program):
    """The fused program as a GraphModule carrying its report, for running and counting."""
    gm = program.module()
    gm.meta["fxrep_report"] = program.graph_module.meta["fxrep_report"]
    return gm


def _compare(fused, x, expected, result: ZooResult) -> None:
    try:
        with torch.no_grad():
            actual = flat_tensors(fused(x))
    except Exception as e:  # noqa: BLE001
        result.outcome, result.detail = "broken", _short(e)
        return
    if len(actual) != len(expected):
        result.outcome, result.detail = "wrong", f"{len(actual)} outputs, expected {len(expected)}"
        return
    for e, a in zip(expected, actual):
        if e.shape != a.shape or e.dtype != a.dtype:
            result.outcome = "wrong"
            result.detail = f"output {tuple(a.shape)} {a.dtype}, expected {tuple(e.shape)}"
            return
        err = relative_error(e, a)
        if not err <= DEFAULT_RTOL.get(e.dtype, 1e-5):
            result.outcome, result.detail = "wrong", f"max|delta|/max|y| = {err:.3g}"
            return


def _check_still_traceable(model, x, result: ZooResult) -> None:
    try:
        with preserved(model):  # plain fx writes Proxies into LeViT's cache: this check must not
            gm = fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - it did not trace before either; nothing to compare
        return
    try:
        with torch.no_grad():
            gm(x)
    except Exception as e:  # noqa: BLE001
        result.outcome = "mutated"
        result.detail = f"after fuse, symbolic_trace(model) gives a graph that fails: {_short(e)}"


def _last_frame(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if "/fxrep/" in f.filename]
    f = (ours or frames)[-1] if frames else None
    return f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" if f else ""
