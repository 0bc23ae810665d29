"""The layers import downwards only: mis_kernels <- models <- mis_api (the Score API's requests
and scoring core) <- serve_app <- mis_score (the command line, which wires everything), and no
product code imports loadtests/ (the load tools); and no other installed distribution has a
top-level package of one of our names."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import pickle
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("mis_kernels", "models", "mis_api", "serve_app", "mis_score", "loadtests")
OURS = {*LAYERS, "tests"}
# What each package may import of ours: itself and the layers below it.
ALLOWED = {name: set(LAYERS[: i + 1]) for i, name in enumerate(LAYERS)}


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
    bad.write_text("def f():\n    from serve_app.config import AppArgs\nimport loadtests.x\n")
    assert imports_of(bad) == {"serve_app", "loadtests"}


def test_our_top_level_names_are_ours_alone(tmp_path):
    """Every package pyproject installs is one of the layers above, no other installed
    distribution ships a package of the same name, and a process started outside the checkout
    (a Ray worker, the CLI) imports ours. transformers 5.25 brought Hugging Face's `kernels`:
    with our attention package then named `kernels`, the one installed first in sys.path won,
    theirs in every Ray worker and ours inside transformers."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {p.removesuffix("*") for p in include} == set(ALLOWED)
    owners = importlib.metadata.packages_distributions()
    assert {n: owners[n] for n in ALLOWED if set(owners.get(n, [])) - {"mis-serve"}} == {}
    where = "import importlib.util as u, json, sys; print(json.dumps({n: u.find_spec(n).origin"
    where += " for n in sys.argv[1:]}))"
    out = subprocess.run(
        [sys.executable, "-c", where, *ALLOWED], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    origins = json.loads(out.stdout)
    assert {n: o for n, o in origins.items() if Path(o) != REPO / n / "__init__.py"} == {}


# Modules whose import a process of that kind must not pay for (seconds and hundreds of MB
# each): the ingress routes and checks requests, the client only speaks HTTP, and the command
# line loads the engine only for a command that scores (not for --help, validate, make-checkpoint
# or batch's driver).
HEAVY = ("jax", "jaxlib", "flax", "torch", "transformers", "models.engine", "models.decoder")


def modules_after_import(module: str, unpickle: bytes = b"") -> set[str]:
    """The modules a fresh process holds after importing `module` and unpickling `unpickle`."""
    code = f"import json, pickle, sys; import {module}; pickle.loads(sys.stdin.buffer.read())"
    code += "; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        input=unpickle or pickle.dumps(None),
        capture_output=True,
    )
    assert out.returncode == 0, out.stderr.decode()
    return set(json.loads(out.stdout))


@pytest.mark.parametrize(
    ("module", "unwanted"),
    [
        ("serve_app.ingress", HEAVY),
        ("mis_score.client", (*HEAVY, "ray")),
        ("mis_score.cli", (*HEAVY, "ray")),
    ],
)
def test_light_processes_import_no_engine(module, unwanted):
    """A new ingress replica (one per app, more when the ingress autoscales) imports no JAX,
    Flax or model code; the Python client neither those nor Ray; `mis-score` none of them
    before it knows its command (`mis-score --help`: 1.15 s with JAX, 0.31 s without)."""
    assert sorted(modules_after_import(module) & set(unwanted)) == []


def test_the_import_check_sees_the_engine_in_a_scorer():
    assert {"jax", "flax", "models.engine", "models.decoder"} <= modules_after_import(
        "serve_app.scorer"
    )


def test_the_ingress_unpickles_what_scorers_send_without_the_engine():
    """What a Scorer's chunk call returns or raises reaches the ingress pickled, and unpickling
    a class imports its module: none of them may live where the engine is imported."""
    import numpy as np

    from models.inputs import ScoringInputError
    from serve_app.chunk_call import ChunkFailure, ChunkResult, EngineFailure, Misdelivered

    sent = [
        ChunkResult(np.zeros((3, 2)), "replica"),
        ChunkFailure("chunk"),
        EngineFailure("engine"),
        Misdelivered("key"),
        ScoringInputError("items: bad"),
    ]
    loaded = modules_after_import("serve_app.ingress", pickle.dumps(sent))
    assert sorted(loaded & set(HEAVY)) == []
