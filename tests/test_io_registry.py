"""The data set registry lives in the io layer: its public names, the textile class entries, and io
importing nothing from the layers above it."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import numpy as np
import pytest

import oodscope.io
from oodscope.io import TEXTILE_CLASSES, DatasetError, registry, resolve_images

IO_DIR = Path(oodscope.io.__file__).resolve().parent
# Layers import downward only: io -> backbones -> features -> text -> detectors -> calibration -> pipeline
# -> evaluation / reports -> cli. io is the bottom one.
ABOVE_IO = ("backbones", "features", "text", "detectors", "calibration", "pipeline", "evaluation", "reports", "cli")

try:
    import conformal_clip_data  # noqa: F401

    HAVE_TEXTILES = True
except ImportError:
    HAVE_TEXTILES = False


def test_public_names_are_importable_from_the_package():
    for name in registry.__all__:
        assert hasattr(registry, name), name
    for name in ("get_dataset", "get_spec", "known_name", "check_dataset", "download_dataset", "get_benchmark",
                 "list_datasets", "list_benchmarks", "register_dataset", "DatasetSpec", "Benchmark", "BENCHMARKS"):
        assert name in registry.__all__, name
    assert importlib.util.find_spec("oodscope.evaluation.datasets") is None  # moved, no shim left behind


def test_textile_class_entries_are_registered_with_their_counts():
    expected = {"nominal": 1000, "local": 500, "global": 500}
    assert set(expected) == set(TEXTILE_CLASSES)
    for kind, n in expected.items():
        spec = registry.get_spec(f"textiles/{kind}")
        assert registry.known_name(f"textiles/{kind}")
        assert spec.offline and spec.expected_files == n and kind in spec.count_source
        assert spec.source == registry.get_spec("textiles").source
    assert sum(expected.values()) == registry.get_spec("textiles").expected_files
    # The old option syntax is refused with the registered name as the hint.
    with pytest.raises(DatasetError, match="textiles/local"):
        resolve_images("textiles:local")


@pytest.mark.skipif(not HAVE_TEXTILES, reason="conformal-clip-data is not installed (pip install conformal-clip-data)")
def test_resolve_images_reads_each_textile_class():
    whole = resolve_images("textiles")
    assert len(whole) == 2000
    for index, (kind, n) in enumerate((("nominal", 1000), ("local", 500), ("global", 500))):
        source = resolve_images(f"textiles/{kind}")
        assert len(source) == n
        assert source.class_names == list(TEXTILE_CLASSES)
        assert np.all(np.asarray(source.labels) == index), kind
    assert registry.check_dataset("textiles/global").ok


def _imported_modules(path: Path, io_dir: Path = IO_DIR) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in one file, relative imports resolved."""
    package = ".".join(("oodscope", *path.relative_to(io_dir.parent).with_suffix("").parts))
    if path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def test_io_imports_nothing_from_the_layers_above_it():
    files = sorted(IO_DIR.rglob("*.py"))
    assert IO_DIR / "registry" / "__init__.py" in files and IO_DIR / "resolve.py" in files
    upward = [f"{path.relative_to(IO_DIR.parent)}:{line}: {module}"
              for path in files for line, module in _imported_modules(path)
              if module.split(".")[0] == "oodscope" and len(module.split(".")) > 1
              and module.split(".")[1] in ABOVE_IO]
    assert not upward, "io imports from a higher layer:\n" + "\n".join(upward)


def test_the_import_checker_sees_relative_and_absolute_imports(tmp_path):
    fake = tmp_path / "io"
    (fake / "sub").mkdir(parents=True)
    (fake / "sub" / "mod.py").write_text(
        "import oodscope.cli\nfrom ...evaluation import bench\nfrom .. import realdata\n"
        "def f():\n    from oodscope import reports\n")
    modules = [m for _, m in _imported_modules(fake / "sub" / "mod.py", fake)]
    assert "oodscope.cli" in modules and "oodscope.evaluation" in modules and "oodscope.reports" in modules
    assert "oodscope.io.realdata" in modules
