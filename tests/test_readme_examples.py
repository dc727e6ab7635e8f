"""Every Python example of the README runs as written, on a 120-image folder of real images.

The examples name folders (``id_images/``, ``incoming/``, ``id/train``, ``id/test``); the test
writes them from the Fashion-MNIST sample that ships with oodscope (120 ID images of three classes,
plus scikit-learn digits as OOD), changes into that directory and executes each ``python`` block of
README.md in order, in one namespace per block. Nothing is hard-coded about what the blocks contain:
a new example is run too.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import oodscope
from oodscope.io import FASHION_MNIST_CLASSES, Relabel, Subset, digits, fashion_mnist, write_image_folder

README = Path(__file__).resolve().parents[1] / "README.md"
SAMPLE = Path(oodscope.__file__).parent / "data" / "fashion-mnist-sample"
#: The README's zero-shot example names these classes; the folders carry the same names.
CLASSES = {"t-shirt": "T-shirt/top", "trousers": "Trouser", "sandal": "Sandal"}

pytestmark = pytest.mark.slow


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _write(folder: Path, per_class: int, start: int) -> None:
    """``per_class`` train images of each README class, named as the README names the classes."""
    train = fashion_mnist("train", root=SAMPLE)
    for name, fm_name in CLASSES.items():
        label = FASHION_MNIST_CLASSES.index(fm_name)
        rows = np.flatnonzero(np.asarray(train.labels) == label)[start:start + per_class]
        write_image_folder(Relabel(Subset(train, rows), None), folder / name)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("readme")
    _write(root / "id_images", 40, 0)  # 120 images
    _write(root / "id" / "train", 40, 0)  # 120 images
    _write(root / "id" / "test", 10, 40)
    incoming = root / "incoming"
    test = fashion_mnist("test", root=SAMPLE)
    write_image_folder(Relabel(Subset(test, np.arange(0, 60, 6)), None), incoming / "clothes")
    write_image_folder(Relabel(Subset(digits(), np.arange(10)), None), incoming / "digits")
    return root


def test_the_readme_has_python_examples() -> None:
    assert len(python_blocks(README.read_text(encoding="utf-8"))) >= 3


@pytest.mark.parametrize("index", range(len(python_blocks(README.read_text(encoding="utf-8")))))
def test_readme_example_runs(index: int, workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    code = python_blocks(README.read_text(encoding="utf-8"))[index]
    monkeypatch.chdir(workdir)
    assert sum(1 for _ in (workdir / "id_images").rglob("*.png")) == 120
    exec(compile(code, f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})
    capsys.readouterr()
