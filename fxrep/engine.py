"""``fxrep.fuse``: trace, validate, run the pattern phases to a fixed point, clean up, report, check."""

from __future__ import annotations

import copy
import dis
import functools
import inspect

import torch
from torch import fx, nn

from .errors import (
    EquivalenceError,
    FxrepError,
    InputError,
    TraceError,
    TrainingModeError,
    UnsupportedModelError,
)
from .ir import merge_origins
from .registry import PHASES, FuseContext, Match, PatternRegistry, Skip, default_registry
from .report import Applied, FuseReport, Skipped
from .stats import graph_stats

MAX_SWEEPS = 50
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@functools.lru_cache(maxsize=1024)
def _unpack_counts(code) -> dict:
    """Offset -> item count of every ``UNPACK_SEQUENCE`` instruction of a code object."""
    return {i.offset: i.argval for i in dis.get_instructions(code) if i.opname == "UNPACK_SEQUENCE"}


class _UnpackingProxy(fx.Proxy):
    """``fx.Proxy`` whose tuple unpacking (``q, k, v = qkv.unbind(0)``, ``B, N, C = x.shape``) looks the
    calling instruction up in a per-code-object table. fx disassembles the caller's whole code object on every
    unpack, which was a third of the trace time of a 12-block branched ViT. Same graph as fx's."""

    def __iter__(self):
        frame = inspect.currentframe().f_back  # f_lasti: byte offset of the instruction being run
        count = _unpack_counts(frame.f_code).get(frame.f_lasti)
        if count is not None:
            return (self[i] for i in range(count))
        return self.tracer.iter(self)


class _NamingTracer(fx.Tracer):
    """A Tracer that remembers which module it was inside, so a trace failure can name it."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.stowed: list[str] = []  # constant attributes this tracer set on the traced model

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _UnpackingProxy(node, self)

    def call_module(self, m, forward, args, kwargs):
        self.stack.append(self.path_of_module(m) or type(m).__name__)
        out = super().call_module(m, forward, args, kwargs)
        self.stack.pop()
        return out

    def _name_of(self, kind: str, t: torch.Tensor) -> str | None:
        """Qualified name of a parameter or buffer of the traced model, from a map built once per trace
        (fx scans every parameter of the model on each lookup, which is quadratic in model size)."""
        if getattr(self, "_names_of", (None, None))[0] is not self.root:
            names: dict = {}
            for name, p in self.root.named_parameters():
                names.setdefault(("param", id(p)), name)
            for name, b in self.root.named_buffers():
                names.setdefault(("buffer", id(b)), name)
            self._names_of = (self.root, names)
        return self._names_of[1].get((kind, id(t)))

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        """As fx's, with the name lookup of ``_name_of``."""
        if isinstance(attr_val, torch.Tensor):
            kind = "param" if isinstance(attr_val, nn.Parameter) else "buffer" if self.proxy_buffer_attributes else None
            name = self._name_of(kind, attr_val)
            if name is not None and not self.param_shapes_constant:
                if name not in parameter_proxy_cache:
                    parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
                return parameter_proxy_cache[name]
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_arg(self, a):
        """As fx's for tensors, with the name lookup of ``_name_of``. A tensor that is neither a parameter nor
        a buffer is stowed as a ``_tensor_constant`` attribute, which ``trace`` moves off the user's model."""
        if isinstance(a, torch.Tensor):
            name = self._name_of("param" if isinstance(a, nn.Parameter) else "buffer", a)
            if name is None and not isinstance(a, nn.Parameter):
                name = self.tensor_attrs.get(a)
                if name is None:
                    name = self.get_fresh_qualname("_tensor_constant")
                    self.tensor_attrs[a] = name
                    setattr(self.root, name, a)
                    self.stowed.append(name)
            if name is not None:
                return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx`` trace of ``model`` with optional None/bool arguments fixed to their defaults.

    timm blocks take ``attn_mask=None``/``is_causal=False``: specializing them keeps the graph free of
    inputs that would make attention unmergeable. Raises TraceError naming the module that failed.
    """
    concrete = {}
    for name, p in inspect.signature(model.forward).parameters.items():
        if p.default is not inspect.Parameter.empty and (p.default is None or isinstance(p.default, bool)):
            concrete[name] = p.default
    tracer = _NamingTracer()
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
        return fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as e:  # torch raises TraceError, TypeError, RuntimeError, ... from user code
        where = tracer.stack[-1] if tracer.stack else type(model).__name__
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__} (failed inside module '{where}'): "
            f"{type(e).__name__}: {e}\n"
            "Fix: data-dependent Python control flow cannot be traced. Make that module a leaf "
            "(a torch.fx.Tracer subclass whose is_leaf_module returns True for it), rewrite the branch with "
            "torch.where, or trace the model yourself and pass the GraphModule to fxrep.fuse."
        ) from e
    finally:
        for name in tracer.stowed:  # the GraphModule holds them now; leave the user's model as it was
            if name in vars(model):
                delattr(model, name)


def _validate(model: nn.Module) -> None:
    if isinstance(model, fx.GraphModule):
        # only the modules its graph calls matter: symbolic_trace makes the GraphModule and the containers on
        # the way to its leaves fresh modules in training mode, which change nothing it computes
        called = {n.target for n in model.graph.nodes if n.op == "call_module"}
        modules = [(f"{t}.{name}".rstrip("."), m) for t in called for name, m in model.get_submodule(t).named_modules()]
    else:
        modules = list(model.named_modules())
    training = [name or type(model).__name__ for name, m in modules if m.training]
    if training:
        raise TrainingModeError(
            f"the model is in training mode (e.g. {', '.join(training[:3])}): Dropout and DropPath are random "
            "there, so no rewrite is exact. Call model.eval() before fxrep.fuse(model).")
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise UnsupportedModelError(
                f"'{name}' is on the meta device: it has no values to fold. Materialize the model first "
                "(model.to_empty(device='cpu') and load a state_dict) and call fuse again.")
        if t.device.type != "cpu":
            raise UnsupportedModelError(
                f"'{name}' is on {t.device}: fxrep does its float64 weight algebra on the CPU. Fuse a CPU copy "
                "(fxrep.fuse(copy.deepcopy(model).cpu())) and move the fused model: fused.to(device).")
        if t.is_quantized:
            raise UnsupportedModelError(
                f"'{name}' is a quantized tensor ({t.dtype}): fxrep folds float weights only. Fuse the float "
                "model first, then quantize the fused model.")
        if isinstance(t, nn.Parameter) and t.dtype not in SUPPORTED_DTYPES:
            raise UnsupportedModelError(
                f"parameter '{name}' has dtype {t.dtype}; fxrep supports {', '.join(map(str, SUPPORTED_DTYPES))}."
                " Convert the model with model.float() before fusing.")
    for name, m in model.named_modules():
        if type(m).__module__.startswith("torch.ao.nn.quantized"):
            raise UnsupportedModelError(
                f"'{name}' is a quantized module ({type(m).__name__}): fuse the float model, then quantize.")


def _propagate_shapes(gm: fx.GraphModule, example_inputs) -> None:
    """Record every node's shape (``meta['tensor_meta']``); patterns use it where structure alone is unclear."""
    from torch.fx.passes.shape_prop import ShapeProp

    for t in example_inputs:
        if isinstance(t, torch.Tensor) and (t.is_quantized or not (t.is_floating_point() or t.dtype in
                                                                    (torch.int64, torch.int32, torch.bool))):
            raise InputError(f"example input of dtype {t.dtype} is not supported: pass float tensors")
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as e:  # noqa: BLE001 - re-raised with the fix named
        shapes = ", ".join(str(tuple(t.shape)) for t in example_inputs if isinstance(t, torch.Tensor))
        raise InputError(f"the model does not run on the example inputs ({shapes}): {type(e).__name__}: {e}\n"
                         "Fix: pass example_inputs with the shapes and dtypes the model expects.") from e


def _inputs_from_shapes(model) -> tuple | None:
    """Random inputs of the traced shapes, when ``model`` is a GraphModule whose placeholders have shapes."""
    if not isinstance(model, fx.GraphModule):
        return None
    metas = [n.meta.get("tensor_meta") for n in model.graph.nodes if n.op == "placeholder"]
    if not metas or any(m is None or not hasattr(m, "shape") for m in metas):
        return None
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(tuple(m.shape), generator=g).to(m.dtype) for m in metas)


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    graph = copy.deepcopy(gm.graph)
    new = fx.GraphModule(gm, graph, type(gm).__name__)
    new.meta = dict(getattr(gm, "meta", {}))
    return new


def _alive(node: fx.Node, graph: fx.Graph) -> bool:
    return node.graph is graph and not getattr(node, "_erased", False)


def _sweep(patterns, ctx: FuseContext, report: FuseReport) -> tuple[int, list]:
    """Run each pattern once over the graph; return (rewrites applied, skips seen)."""
    applied = 0
    skips: list = []
    for pattern in patterns:
        matches = []
        taken: set = set()
        for node in list(ctx.graph.nodes):
            if not _alive(node, ctx.graph):
                continue
            result = pattern.match(node, ctx)
            if isinstance(result, Skip):
                skips.append(Skipped(pattern.name, result.reason, merge_origins(result.nodes)))
            elif isinstance(result, Match):
                if taken.isdisjoint(result.nodes):
                    matches.append(result)
                    taken.update(result.nodes)
            elif result is not None:
                raise FxrepError(f"pattern {pattern.name!r}: match() returned {type(result).__name__}; "
                                 "return a fxrep.Match, a fxrep.Skip or None")
        for m in matches:
            if not all(_alive(n, ctx.graph) for n in m.nodes):
                continue
            origins = tuple(m.origins) or merge_origins(m.nodes)
            details = pattern.replace(m, ctx) or {}
            report.applied.append(Applied(pattern.name, m.summary, origins, dict(details)))
            applied += 1
        if matches:
            _cleanup(ctx)
    return applied, skips


def _cleanup(ctx: FuseContext) -> None:
    _eliminate_dead_code(ctx.graph)
    ctx.invalidate()


def _eliminate_dead_code(graph: fx.Graph) -> None:
    """``Graph.eliminate_dead_code`` without its lint and with the purity check only for unused nodes:
    the same result, in a fraction of the time on large graphs (run_patterns lints once per phase)."""
    for node in reversed(graph.nodes):
        if not node.users and not node.is_impure():
            graph.erase_node(node)


def _drop_unused_attributes(gm: fx.GraphModule) -> None:
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [n for n, _ in gm.named_parameters(recurse=False)] + [n for n, _ in gm.named_buffers(recurse=False)]:
        if name not in used:  # fxrep's own intermediates, and constants the tracer made that were folded
            delattr(gm, name)
    gm.delete_all_unused_submodules()


def run_patterns(gm: fx.GraphModule, registry: PatternRegistry, report: FuseReport, options=None) -> None:
    """Run every phase of ``registry`` on ``gm`` in place (gm must be fxrep's own copy).

    Skips are collected from every sweep; one is dropped when the same pattern later rewrote the same
    nodes (a candidate that became mergeable after another rewrite is not a near miss)."""
    ctx = FuseContext(gm, dict(options or {}))
    skips: dict = {}
    for phase in PHASES:
        patterns = registry.in_phase(phase)
        if not patterns:
            continue
        for _ in range(MAX_SWEEPS):
            report.sweeps += 1
            applied, seen = _sweep(patterns, ctx, report)
            for s in seen:
                skips.setdefault((s.pattern, s.reason, s.origins), s)
            if not applied:
                ctx.graph.lint()  # a pattern that broke the graph is caught at the end of its phase
                break
        else:
            raise FxrepError(f"phase {phase!r} did not reach a fixed point in {MAX_SWEEPS} sweeps; "
                             "a pattern keeps rewriting its own output (its match must return None once done)")
    done: dict = {}
    for a in report.applied:
        done.setdefault(a.pattern, set()).update(a.origins)
    report.skipped += [s for s in skips.values() if not set(s.origins) & done.get(s.pattern, set())]


def fuse(model, *, example_inputs=None, patterns=None, check: bool = False, rtol: float | None = None):
    """Rewrite ``model`` into an equivalent GraphModule with parallel branches merged.

    Args:
        model: an ``nn.Module`` (traced with torch.fx) or a ``torch.fx.GraphModule``; must be in eval mode.
            It is never modified: fxrep builds new parameters and a new graph.
        example_inputs: a tensor or tuple of tensors, used by ``check`` and for the FLOP counts of the report.
        patterns: a ``PatternRegistry`` or list of patterns (default: ``default_registry()``).
        check: run original and fused model on ``example_inputs`` and raise EquivalenceError if they differ
            by more than ``rtol`` (default by dtype: 1e-5 float32, 1e-10 float64, 1e-2 fp16/bf16) relative
            to max |y|.

    Returns:
        A new ``torch.fx.GraphModule``; its ``meta["fxrep_report"]`` is a FuseReport (``print`` it).
    """
    if not isinstance(model, nn.Module):
        raise FxrepError(f"fxrep.fuse takes an nn.Module or a torch.fx.GraphModule, not {type(model).__name__}")
    _validate(model)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    gm = _copy_graph_module(model) if isinstance(model, fx.GraphModule) else trace(model)
    gm.eval()
    registry = patterns if isinstance(patterns, PatternRegistry) else \
        (PatternRegistry(patterns) if patterns is not None else default_registry())
    if example_inputs is not None:
        _propagate_shapes(gm, example_inputs)
    report = FuseReport()
    report.before = graph_stats(gm, example_inputs)
    run_patterns(gm, registry, report)
    _drop_unused_attributes(gm)
    gm.graph.lint()
    gm.recompile()
    report.after = graph_stats(gm, example_inputs)
    gm.meta["fxrep_report"] = report
    if check:
        if example_inputs is None:
            example_inputs = _inputs_from_shapes(model)
        if example_inputs is None:
            raise InputError("fuse(check=True) needs example_inputs=(tensor, ...) with the model's input "
                             "shapes (or a GraphModule whose placeholders carry shapes from ShapeProp), to compare "
                             "the fused model against the original.")
        from .testing import assert_fused_equivalent

        try:
            assert_fused_equivalent(model, example_inputs, fused=gm, rtol=rtol)
        except EquivalenceError as e:
            raise EquivalenceError(f"{e}\nPatterns applied: {report.patterns_applied()}. If you registered "
                                   "a custom pattern, its replace() is the first suspect.") from None
    return gm
