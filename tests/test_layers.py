"""The package tree is the architecture (docs/architecture.md, "Layers"): a lower layer never
imports a higher one, no import circle exists, and no t2v module hides an import of another
inside a function (every edge of the graph is visible at the top of its file)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Base modules: everything may import them; they import only each other (config: errors only).
BASE = {"t2v", "t2v.errors", "t2v.noise", "t2v.atomic", "t2v.config", "t2v.process_end"}
BASE_IMPORTS = {"t2v.config": {"t2v", "t2v.errors"}, "t2v.errors": {"t2v"}, "t2v.noise": {"t2v"},
                "t2v.atomic": {"t2v", "t2v.errors"}, "t2v.process_end": {"t2v"}}
ENTRY_POINTS = {"t2v.sample", "t2v.train", "t2v.app", "t2v.eval"}
# layer -> the layers it may import (besides itself and the base)
ALLOWED = {
    "models": set(),
    "sampling": {"models"},
    "loading": {"models", "weights_convert"},
    "weights_convert": {"models", "loading"},
    "pipeline": {"models", "sampling", "loading", "weights_convert"},
    "training": {"models", "sampling", "loading", "weights_convert", "pipeline"},
    "cli": {"models", "sampling", "loading", "weights_convert", "pipeline", "training"},
    "demo": {"models", "sampling", "loading", "weights_convert", "pipeline", "training", "cli"},
    "bench": {"models", "sampling", "loading", "weights_convert", "pipeline", "training"},
    "entry": {"cli", "training", "demo"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str | None:
    if module in BASE:
        return None
    if module in ENTRY_POINTS:
        return "entry"
    parts = module.split(".")
    if parts[0] == "weights_convert":
        return "weights_convert"
    return parts[1]


def resolve(name: str, modules: set[str]) -> str | None:
    """The project module an imported dotted name refers to (a module or a name in one)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports(path: Path, modules: set[str]) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) for every import in `path`."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [f"{child.module}.{a.name}" for a in child.names] or [child.module]
            for name in names:
                target = resolve(name, modules)
                if target is not None:
                    found.append((target, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def graph() -> dict[str, list[tuple[str, int, bool]]]:
    files = [p for d in ("t2v", "weights_convert") for p in (ROOT / d).rglob("*.py")]
    modules = {module_name(p) for p in files}
    return {module_name(p): imports(p, modules) for p in files}


GRAPH = graph()


def test_every_module_has_a_layer():
    for module in GRAPH:
        layer = layer_of(module)
        assert module in BASE or layer in ALLOWED, f"{module}: no layer (add it to ALLOWED)"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_import_goes_up_a_layer(module):
    layer = layer_of(module)
    for target, line, _ in GRAPH[module]:
        if target == module or target.startswith(module + ".") and module == "t2v":
            continue
        if module in BASE:
            assert target in BASE_IMPORTS.get(module, set()), \
                f"{module} (line {line}) imports {target}; base modules import only the base"
            continue
        other = layer_of(target)
        assert other is None or other == layer or other in ALLOWED[layer], \
            f"{module} (layer {layer}, line {line}) imports {target} (layer {other})"


def test_no_import_inside_functions():
    hidden = [f"{module}:{line} imports {target}" for module, edges in GRAPH.items()
              for target, line, in_function in edges if in_function]
    assert not hidden, "project imports inside functions (move them to the top):\n" + \
        "\n".join(hidden)


def test_no_import_circle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target, _, _ in GRAPH.get(module, []):
            if target == module or target == "t2v":
                continue
            if state.get(target) == 1:
                circle = path[path.index(target):] + [target]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if target not in state:
                walk(target)
        path.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            walk(module)


def test_the_checker_sees_a_violation(tmp_path):
    """The layer rules catch an upward import and a function-level one (the test can fail)."""
    fake = tmp_path / "t2v" / "models" / "bad.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("from t2v.pipeline.text_to_video import TextToVideo\n"
                    "def f():\n    from t2v.sampling.samplers import SAMPLERS\n")
    modules = set(GRAPH) | {"t2v.models.bad"}
    found = imports(fake, modules)
    assert [(t, f) for t, _, f in found] == [("t2v.pipeline.text_to_video", False),
                                             ("t2v.sampling.samplers", True)]
    assert "pipeline" not in ALLOWED[layer_of("t2v.models.bad")]
