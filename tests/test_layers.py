"""The layers import downwards only: kernels <- models <- serve_app <- mis_score (the command
line, which wires everything), and no product code imports loadtests/ (the load tools)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OURS = {"kernels", "models", "serve_app", "mis_score", "loadtests", "tests"}
# What each package may import of ours (itself included).
ALLOWED = {
    "kernels": {"kernels"},
    "models": {"kernels", "models"},
    "serve_app": {"kernels", "models", "serve_app"},
    "mis_score": {"kernels", "models", "serve_app", "mis_score"},
    "loadtests": {"kernels", "models", "serve_app", "mis_score", "loadtests"},
}


def imports_of(path: Path) -> set[str]:
    """Top-level packages of ours that a module imports anywhere (function bodies too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {n.split(".")[0] for n in names} & OURS
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_it_builds_on(package):
    wrong = {
        str(p.relative_to(REPO)): sorted(imports_of(p) - ALLOWED[package])
        for p in sorted((REPO / package).rglob("*.py"))
    }
    assert not {k: v for k, v in wrong.items() if v}, wrong


def test_the_rule_catches_an_upward_import(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from serve_app.schema import ScoreRequest\nimport loadtests.x\n")
    assert imports_of(bad) == {"serve_app", "loadtests"}
