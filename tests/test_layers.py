"""The top-level packages depend on each other in one direction (docs/architecture.md):
world -> catalog / filtering -> kernels -> ann / idmap -> stages -> fresh / training ->
builder -> client -> loadtest -> serving. A test reads every import (lazy ones inside functions
too) and fails on one that points the wrong way, which is what a cycle needs."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# each package may import only packages of a lower layer (or itself)
LAYERS = [
    ("world",),
    ("catalog", "filtering"),
    ("kernels",),
    ("ann", "idmap"),
    ("stages",),
    ("fresh", "training"),
    ("builder",),
    ("client",),
    ("loadtest",),
    ("serving",),
]
LAYER = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def imports(root: Path, package: str):
    """(file, imported top-level package) of every absolute import in `package`."""
    for path in sorted((root / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in LAYER and top != package:
                    yield path.relative_to(root), top


def upward(root: Path):
    return [f"{path} imports {top} (layer {LAYER[top]} >= its own {LAYER[package]})"
            for package in LAYER for path, top in imports(root, package)
            if LAYER[top] >= LAYER[package]]


def test_every_package_is_in_a_layer():
    from tomllib import loads

    packages = loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert sorted(packages) == sorted(LAYER)


def test_imports_point_down_the_layers():
    wrong = upward(ROOT)
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("source", ["from builder.build import build\n",
                                    "def f():\n    import training.train\n"])
def test_the_check_sees_an_upward_import(tmp_path, source):
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "x.py").write_text(source)
    assert len(upward(tmp_path)) == 1
