"""Shared pieces of the ``oodscope serve`` tests: a tiny saved model on real digits and PNG bytes.

The model: :func:`tiny_models.tiny_classifier` (a TinyCNN through TorchClassifier) + KNN, fitted on
scikit-learn digits 0-4 (ID; a linear-probe head, APS prediction sets) and calibrated on held-out
ones at alpha = 0.1. Digits 5-9 are near-OOD, Fashion-MNIST-like noise textures far-OOD.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest

ID_CLASSES = (0, 1, 2, 3, 4)


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def digit_images(classes, per_class: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from oodscope.io import digits

    src = digits()
    rows = np.concatenate([np.flatnonzero(src.labels == c)[offset:offset + per_class] for c in classes])
    return src.images[rows], src.labels[rows]


def build_model(directory: Path, per_class: int = 40):
    """Fit, calibrate and save the tiny model; returns its directory."""
    from tiny_models import tiny_classifier

    from oodscope.io import ArrayDataset
    from oodscope.pipeline import OODModel

    images, labels = digit_images(ID_CLASSES, per_class)
    source = ArrayDataset(images, labels, [str(c) for c in ID_CLASSES], name="digits")
    model = OODModel(tiny_classifier(), "knn", {"k": 5}, alpha=0.1, num_workers=0, progress=False)
    model.fit(source, calibration_fraction=0.5)
    model.save(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("serve-model") / "digits-knn")


def test_images(n_id: int = 6, n_ood: int = 6) -> tuple[list[bytes], list[bytes]]:
    """PNG bytes of held-out ID digits (never fitted or calibrated on) and of OOD digits."""
    id_images, _ = digit_images(ID_CLASSES, n_id // len(ID_CLASSES) + 1, offset=100)
    ood_images, _ = digit_images((5, 6, 7, 8, 9), n_ood // 5 + 1)
    return [png(x) for x in id_images[:n_id]], [png(x) for x in ood_images[:n_ood]]


test_images.__test__ = False  # a helper, not a test


def load_model(directory: Path):
    from tiny_models import tiny_classifier

    from oodscope.pipeline import OODModel

    return OODModel.load(directory, backbone=tiny_classifier(), num_workers=0, progress=False)


def subprocess_env() -> dict[str, str]:
    """Environment for a child process that imports tiny_models and oodscope from this checkout."""
    env = dict(os.environ)
    here = str(Path(__file__).parent)
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env
