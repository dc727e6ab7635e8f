"""Imports point down only: each package of oodscope imports from the layers below it, never above.

The order (docs/architecture.md): io -> backbones -> features -> text -> detectors -> calibration ->
pipeline -> engines -> evaluation -> reports -> cli (and the demo, which the CLI runs). Every ``import`` and
``from ... import`` of an ``oodscope.*`` module anywhere in a file counts, lazy ones inside
functions included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import oodscope

ORDER = ["io", "backbones", "features", "text", "detectors", "calibration", "pipeline", "engines", "evaluation",
         "reports", "serve", "cli"]
#: Top-level modules and the layer they belong to.
MODULE_LAYER = {"demo": "cli", "__init__": None, "__main__": "cli"}
ROOT = Path(oodscope.__file__).parent


def _layer_of_file(path: Path) -> str | None:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else MODULE_LAYER.get(rel.stem, rel.stem)


def _layer_of_module(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "oodscope" or len(parts) == 1:
        return None
    return MODULE_LAYER.get(parts[1], parts[1])


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return out


def upward_imports() -> list[str]:
    problems = []
    for path in sorted(ROOT.rglob("*.py")):
        here = _layer_of_file(path)
        if here is None:
            continue
        for line, module in _imports(path):
            there = _layer_of_module(module)
            if there is None or there == here:
                continue
            if there not in ORDER or here not in ORDER:
                problems.append(f"{path.relative_to(ROOT)}:{line}: {here} or {there} is not a known layer")
            elif ORDER.index(there) > ORDER.index(here):
                problems.append(f"{path.relative_to(ROOT)}:{line}: {here} imports {module} (a layer above)")
    return problems


def test_every_package_is_a_known_layer() -> None:
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert packages <= set(ORDER), f"packages not in the layer order: {sorted(packages - set(ORDER))}"


def test_no_upward_import() -> None:
    problems = upward_imports()
    assert not problems, "\n".join(problems)


def test_the_check_catches_an_upward_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "oodscope"
    (fake / "io").mkdir(parents=True)
    (fake / "io" / "bad.py").write_text("def f():\n    from oodscope.cli.main import main\n")
    (fake / "cli").mkdir()
    (fake / "cli" / "ok.py").write_text("from oodscope.io import resolve_images\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", fake)
    assert upward_imports() == ["io/bad.py:2: io imports oodscope.cli.main (a layer above)"]
