"""Tiny backbones reachable by spec from the command line (``tiny-cnn``, ``tiny-vl``), and small
image folders, so that CLI tests run whole commands in a second instead of on EfficientNet."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image
from tiny_models import tiny_classifier

from oodscope.backbones.base import Features

TINY_CLASSIFIER = "tiny-cnn"
TINY_VISION_LANGUAGE = "tiny-vl"


class FakeText:
    """Deterministic unit vectors from a hash of each text (a stand-in sentence encoder)."""

    def __init__(self, dim: int = 8) -> None:
        self.dim = dim

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        out = []
        for t in texts:
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:4], "little")
            v = np.random.default_rng(seed).normal(size=self.dim)
            out.append(v / np.linalg.norm(v))
        return np.asarray(out, dtype=np.float32)


class TinyVisionLanguage:
    """The tiny CNN's normalized penultimate features as embeddings, plus a fake text encoder."""

    def __init__(self) -> None:
        self.inner = tiny_classifier(0)
        self.id = TINY_VISION_LANGUAGE
        self.input_spec = self.inner.input_spec
        self.device = self.inner.device
        self.text = FakeText(8)

    def weights_fingerprint(self) -> str:
        return "tiny-vl:" + self.inner.weights_fingerprint()

    def encode_images(self, batch):
        f = self.inner.encode_images(batch)
        e = f.penultimate / np.maximum(np.linalg.norm(f.penultimate, axis=1, keepdims=True), 1e-12)
        return Features(embedding=e.astype(np.float32), backbone_id=self.id)

    def encode_texts(self, texts):
        return self.text.encode_texts(texts)


def install(monkeypatch) -> None:
    """Make ``tiny-cnn`` and ``tiny-vl`` creatable by spec in this process."""
    from oodscope import backbones

    real = backbones.create

    def create(spec: str, **options):
        if spec == TINY_CLASSIFIER:
            return tiny_classifier(0)
        if spec == TINY_VISION_LANGUAGE:
            return TinyVisionLanguage()
        return real(spec, **options)

    monkeypatch.setattr(backbones, "create", create)
    backbones.clear_shared()


def write_images(folder: Path, n: int, seed: int, low: int = 0, high: int = 256, size: int = 16) -> list[Path]:
    """``n`` random RGB PNGs in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        pixels = rng.integers(low, high, size=(size, size, 3)).astype(np.uint8)
        path = folder / f"img{i:03d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def class_folders(root: Path, classes: dict[str, int], seed: int = 0) -> Path:
    """``root/<class>/`` with the given number of images per class (classes differ in brightness)."""
    for k, (name, n) in enumerate(classes.items()):
        write_images(root / name, n, seed + k, low=40 * k, high=40 * k + 120)
    return root
