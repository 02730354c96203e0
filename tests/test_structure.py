"""The shape of the code, checked: no module over 400 lines, no function over ~60, and no import cycles among
fxrep's modules (imports inside functions count). See docs/architecture.md, "Where code lives"."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fxrep"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def modules() -> dict:
    """Dotted module name -> path, for every module of the fxrep package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: set) -> set:
    """The fxrep modules ``name`` imports anywhere in its file (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in known else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in known and m != name}


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"split these modules: {long}"


def test_no_function_is_over_60_lines():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}")
    assert not long, f"split these functions into named steps: {long}"


def _cycle(graph: dict):
    """One import cycle of ``graph`` as a list of modules, or None (package __init__ re-exports of their own
    submodules are not cycles: a package imports what it contains)."""
    state: dict = {}

    def visit(m, stack):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if n.startswith(m + "."):
                continue  # a package importing its own submodule
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n, stack)
                if found:
                    return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m, [])
            if found:
                return found
    return None


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"p": {"p.x"}, "p.x": {"q"}, "q": set()}) is None


def test_no_import_cycles():
    mods = modules()
    graph = {name: imports(name, path, set(mods)) for name, path in mods.items()}
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize("leaf", ["fxrep.equivalence", "fxrep.snapshot", "fxrep.pattern", "fxrep.errors",
                                  "fxrep.numerics"])
def test_leaf_modules_stay_leaves(leaf):
    """fuse(check=True) must not import hypothesis or the generators; the pattern API imports only ir."""
    mods = modules()
    deps = imports(leaf, mods[leaf], set(mods))
    allowed = {"fxrep.pattern": {"fxrep.ir"}, "fxrep.numerics": set(),
               "fxrep.equivalence": {"fxrep.errors", "fxrep.snapshot", "fxrep.numerics"},
               "fxrep.snapshot": set(), "fxrep.errors": set()}[leaf]
    assert all(any(d == a or d.startswith(a + ".") for a in allowed) for d in deps), deps
    source = mods[leaf].read_text()
    assert "import hypothesis" not in source and "from hypothesis" not in source


def test_patterns_do_not_reach_into_each_other():
    """A pattern module imports the recognition layer and the analyses, never another pattern module."""
    mods = modules()
    for name, path in mods.items():
        if name.startswith("fxrep.patterns."):
            others = {m for m in imports(name, path, set(mods)) if m.startswith("fxrep.patterns")}
            assert not others, f"{name} imports {others}"


# The layers (docs/architecture.md): the compiler core, and the rooms built on it. The core never imports
# a room, so `import fxrep` and `fxrep.fuse` load no deployment, training or test code.
ROOMS = {
    "deploy": ("fxrep.export",),
    "training": ("fxrep.training",),
    "testing": ("fxrep.testing",),
    "tools": ("fxrep.demo", "fxrep.cli", "fxrep.benchmarking", "fxrep.models"),
}


def _room(name: str):
    for room, prefixes in ROOMS.items():
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return room
    return "core"


def test_the_core_never_imports_a_room():
    mods = modules()
    wrong = {name: sorted(m for m in imports(name, path, set(mods)) if _room(m) != "core")
             for name, path in mods.items() if _room(name) == "core"}
    wrong = {k: v for k, v in wrong.items() if v}
    assert not wrong, f"core modules importing deployment, training, testing or tools: {wrong}"


def test_deployment_does_not_import_training_or_testing():
    mods = modules()
    for name, path in mods.items():
        if _room(name) == "deploy":
            rooms = {_room(m) for m in imports(name, path, set(mods))}
            assert rooms <= {"core", "deploy"}, f"{name} imports {rooms}"


@pytest.mark.parametrize("module", ["fxrep", "fxrep.export", "fxrep.testing", "fxrep.ir"])
def test_the_public_api_is_stated_and_resolves(module):
    """Each public module lists what is public, and every listed name exists."""
    import importlib

    mod = importlib.import_module(module)
    assert mod.__all__, f"{module} states no public API"
    missing = [name for name in mod.__all__ if not hasattr(mod, name)]
    assert not missing, f"{module}.__all__ lists names it does not have: {missing}"
    assert len(mod.__all__) == len(set(mod.__all__))


@pytest.mark.parametrize("module", ["fxrep", "fxrep.export", "fxrep.testing", "fxrep.ir"])
def test_everything_else_is_private_by_name(module):
    """A public module's namespace holds its ``__all__``, its submodules and names that start with ``_``:
    what fxrep's own modules share is imported from the submodules, never through the public namespace."""
    import importlib
    import types

    mod = importlib.import_module(module)
    extra = [n for n in dir(mod) if not n.startswith("_") and n not in mod.__all__
             and not isinstance(getattr(mod, n), types.ModuleType)]
    assert not extra, f"{module} has public names outside __all__: {extra}"


def _dotted(node) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else None


# the two op sets that are not about ops fxrep understands: Python's in-place operators, and the functions
# whose values do not depend on tensor values (the shape arithmetic the attention probe evaluates)
_NOT_OP_KNOWLEDGE = {("fxrep/ir/targets.py", "INPLACE_OPERATORS"),
                     ("fxrep/ir/targets.py", "SHAPE_ARITHMETIC")}


def test_what_fxrep_knows_about_an_op_is_declared_only_in_its_spec():
    """No module but ``ir/known_ops.py`` writes a table of torch callables, ATen overloads or module classes
    (two or more in one literal at module level): every other table is derived from the op specs. Tables of
    dtypes are not op knowledge."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).as_posix()
        if rel == "fxrep/ir/known_ops.py":
            continue
        for statement in ast.parse(path.read_text()).body:
            if not isinstance(statement, (ast.Assign, ast.AnnAssign)) or statement.value is None:
                continue
            value = statement.value
            elements = value.keys if isinstance(value, ast.Dict) else getattr(value, "elts", [])
            refs = [d for e in elements if e is not None and (d := _dotted(e))
                    and d.split(".")[0] in ("torch", "F", "aten", "operator", "nn")
                    and not d.startswith(("torch.float", "torch.bfloat", "torch.int", "torch.uint"))]
            target = statement.targets[0] if isinstance(statement, ast.Assign) else statement.target
            name = getattr(target, "id", "?")
            if len(refs) >= 2 and (rel, name) not in _NOT_OP_KNOWLEDGE:
                found.append(f"{rel}: {name} = {refs}")
    assert not found, "op tables outside the specs (fxrep/ir/known_ops.py):\n" + "\n".join(found)
