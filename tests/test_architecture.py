"""The house rules, checked in the suite CI runs: import-linter's contracts and module-level project imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("federation", "privacy", "clients", "aggregator", "he_inference", "simulations")


def _imported(node: ast.AST) -> list[str]:
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return [node.module]
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    return []


def _isort_order(name: str) -> tuple[int, str]:
    """Constants, then classes, then the rest, each alphabetical."""
    return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)


def test_the_import_contracts_in_pyproject_hold() -> None:
    lint_imports = Path(sys.executable).parent / "lint-imports"

    done = subprocess.run([str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)

    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_project_imports_sit_at_module_level_unless_a_comment_says_why() -> None:
    inside = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            source = path.read_text()
            lines = source.splitlines()
            for fn in ast.walk(ast.parse(source)):
                if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                for node in ast.walk(fn):
                    names = [n for n in _imported(node) if n.split(".")[0] in PACKAGES]
                    if names and "#" not in lines[node.lineno - 1]:
                        inside.append(f"{path.relative_to(ROOT)}:{node.lineno} {fn.name}: {names}")

    assert inside == []


def test_every_package_has_a_docstring_and_a_sorted_all() -> None:
    for package in PACKAGES:
        tree = ast.parse((ROOT / package / "__init__.py").read_text())
        exported = [node.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
                    and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)]

        assert ast.get_docstring(tree), package
        assert len(exported) == 1, package
        names = ast.literal_eval(exported[0])
        assert names, package
        assert names == sorted(names, key=_isort_order), package  # the order ruff's RUF022 keeps
