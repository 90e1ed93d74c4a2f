"""The package's import rules, read from the source: layers point down, project imports sit at module level."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import he_inference

PACKAGE = Path(he_inference.__file__).parent
# Lowest first. A module may import its own layer and those below it, never one above.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("ckks", "serial", "passes.ir"),
    ("passes.trace", "passes.fold", "passes.layout", "passes.program", "passes.lower", "passes.levels",
     "passes.cost", "passes.interpret", "passes", "images"),
    ("artifact", "compiler", "keys", "engine", "parallel"),
    ("server", "client", "service"),
    ("roundtrip", "check", "bench", "demo"),
    ("cli",),
)
FORBIDDEN = ("clients", "aggregator", "privacy", "simulations")   # he_inference stands on federation only
PROJECT = ("he_inference", "federation", *FORBIDDEN)


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text())
    return out


def _imported(node: ast.AST) -> list[str]:
    if isinstance(node, ast.ImportFrom) and node.module:
        return [node.module]
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    return []


def _project_imports(tree: ast.Module) -> set[str]:
    return {name for node in ast.walk(tree) for name in _imported(node) if name.split(".")[0] in PROJECT}


def test_every_module_has_a_layer() -> None:
    assert set(_modules()) - {""} == {m for layer in LAYERS for m in layer}


def test_he_inference_never_imports_the_packages_above_the_ground() -> None:
    bad = {(m, name) for m, tree in _modules().items() for name in _project_imports(tree)
           if name.split(".")[0] in FORBIDDEN}

    assert bad == set()


def test_imports_point_down_the_layers_and_form_no_cycle() -> None:
    level = {m: n for n, layer in enumerate(LAYERS) for m in layer}
    graph: dict[str, set[str]] = {}
    upward = []
    for m, tree in _modules().items():
        if m == "":
            continue   # the package's own __init__ re-exports the top names
        deps = {name.removeprefix("he_inference.") for name in _project_imports(tree)
                if name.startswith("he_inference.")}
        graph[m] = deps - {m}
        upward += [(m, d) for d in deps if level[d] > level[m]]

    assert upward == []
    tuple(graphlib.TopologicalSorter(graph).static_order())   # CycleError if any


def test_the_server_and_the_client_do_not_import_each_other() -> None:
    modules = _modules()

    assert "he_inference.client" not in _project_imports(modules["server"])
    assert "he_inference.server" not in _project_imports(modules["client"])


def test_project_imports_sit_at_module_level() -> None:
    inside = []
    for m, tree in _modules().items():
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                inside += [(m, fn.name, name) for node in ast.walk(fn) for name in _imported(node)
                           if name.split(".")[0] in PROJECT]

    assert inside == []
