"""Dependencies run one way: core -> serving -> clients and deployment -> tools -> tests (docs/architecture.md).

A module may import its own layer and the ones below, never one above: the core (geometry, masks, models,
the response) knows nothing of Triton; what runs in or starts Triton knows nothing of the clients.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

LAYERS = {"core": 0, "serving": 1, "clients": 2, "tools": 3, "tests": 4}


def layer_of_module(name: str) -> str | None:
    """The layer of an importable module name of this repository, None for third-party modules."""
    top = name.split(".")[0]
    if name == "anomaly.serving" or name.startswith("anomaly.serving."):
        return "serving"
    if top == "anomaly":
        return "core"
    if top in ("client", "export", "runpod_handler"):
        return "clients"
    if top == "bench":
        return "tools"
    if top == "tests":
        return "tests"
    return None


def layer_of_file(path: Path) -> str:
    rel = path.relative_to(REPO)
    if rel.parts[0] == "model_repository":  # Triton's steps
        return "serving"
    module = ".".join(rel.with_suffix("").parts)
    return layer_of_module(module.removesuffix(".__init__")) or "tools"


def imported_modules(path: Path) -> set[str]:
    """Every absolute module a file imports, wherever the import statement is (lazy imports count too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def source_files() -> list[Path]:
    folders = ("anomaly", "client", "export", "runpod_handler", "bench", "model_repository")
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", source_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_imports_a_higher_layer(path):
    own = LAYERS[layer_of_file(path)]
    above = sorted(name for name in imported_modules(path) if (layer := layer_of_module(name)) and LAYERS[layer] > own)
    assert not above, f"{path.relative_to(REPO)} ({layer_of_file(path)}) imports a higher layer: {above}"


def test_the_layering_check_catches_an_upward_import(tmp_path):
    """The check itself: the core importing the client, or serving importing the RunPod handler, is found."""
    assert layer_of_module("anomaly.geometry") == "core" and layer_of_module("anomaly.serving.plan") == "serving"
    assert layer_of_module("client.cli") == "clients" and layer_of_module("numpy") is None
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from client import AnomalyClient\n    import runpod_handler.jobs\n")
    assert {"client", "client.AnomalyClient", "runpod_handler.jobs"} <= imported_modules(bad)
