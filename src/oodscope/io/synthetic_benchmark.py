"""The offline pixel-level anomaly benchmark: real textures, synthetic defects, MVTec AD's layout.

Categories (all real images available offline):

* ``brick``, ``grass``, ``gravel`` -- scikit-image's 512x512 texture photographs (``skimage.data``);
  the training crops come from the top half of the photograph and the test crops from the bottom
  half, so no test pixel was seen in training;
* ``textile`` -- the nominal images of ``conformal-clip-data`` (250x250 simulated textiles):
  even-numbered files for training, odd-numbered ones for testing.

``train/good`` holds crops of the texture; ``test/good`` other crops; ``test/<kind>`` crops with one
synthetic defect each (:mod:`oodscope.io.synthetic_anomalies`: DRAEM-style Perlin anomalies filled
from another texture, scratches, holes, stains) and ``ground_truth/<kind>/<stem>_mask.png`` their
masks (0/255). The folder is a pure function of ``(categories, counts, size, seed)``; a
``manifest.json`` records them, and :func:`ensure_synthetic_mvtec` builds it once into the cache
(written to a temporary folder, then renamed, so a reader never sees half of it).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .synthetic_anomalies import DEFECT_KINDS, add_defect

__all__ = [
    "SYNTHETIC_CATEGORIES",
    "SYNTHETIC_DEFAULTS",
    "build_synthetic_mvtec",
    "ensure_synthetic_mvtec",
    "texture",
]

SYNTHETIC_CATEGORIES: tuple[str, ...] = ("brick", "grass", "gravel", "textile")
#: The registered benchmark's settings (``synthetic-ad``): images per split and kind, crop size, seed.
SYNTHETIC_DEFAULTS = {"n_train": 60, "n_test_good": 20, "n_per_kind": 10, "size": 128, "seed": 0}
#: Extra anomaly-source images for the Perlin fill (besides the other categories): skimage colour photos.
_FILL_EXTRA = ("coffee", "chelsea", "astronaut", "rocket")
_VERSION = 1


def _skimage(name: str) -> np.ndarray:
    try:
        from skimage import data
    except ImportError as err:
        raise ImportError("the synthetic benchmark needs scikit-image's sample images: pip install scikit-image "
                          "(or pip install 'oodscope[data]')") from err
    return np.asarray(getattr(data, name)())


def _textile_files() -> list[Path]:
    try:
        import conformal_clip_data
    except ImportError as err:
        raise ImportError("the textile category needs conformal-clip-data: pip install conformal-clip-data") from err
    folder = Path(conformal_clip_data.textile_simulated_root()) / "nominal"
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def texture(category: str) -> np.ndarray | list[Path]:
    """The raw material of a category: the texture photograph (uint8) or, for textile, its files."""
    if category == "textile":
        return _textile_files()
    if category not in SYNTHETIC_CATEGORIES:
        raise ValueError(f"category must be one of {SYNTHETIC_CATEGORIES}, got {category!r}")
    return _skimage(category)


def _rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return np.ascontiguousarray(a[..., :3]).astype(np.uint8)


class _Cropper:
    """Draws crops of one category for one split (train: top half / even files; test: bottom / odd)."""

    def __init__(self, category: str, split: str, size: int) -> None:
        self.size = size
        raw = texture(category)
        if isinstance(raw, list):
            files = raw[0::2] if split == "train" else raw[1::2]
            self.files, self.photo, self._order, self._next = files, None, None, 0
        else:
            img = _rgb(raw)
            half = img.shape[0] // 2
            self.photo = img[:half] if split == "train" else img[half:]
            self.files = None
            if min(self.photo.shape[:2]) < size:
                raise ValueError(f"{category}: crops of {size} px do not fit in {self.photo.shape[:2]}")

    def crops(self, n: int, rng: np.random.Generator) -> list[np.ndarray]:
        if self.files is not None:
            # Without replacement across calls: a test file is used once (good or defective), never twice.
            if self._order is None:
                self._order = rng.permutation(len(self.files))
            if self._next + n > len(self.files):
                raise ValueError(f"asked for {self._next + n} textile images, only {len(self.files)} in this split")
            picked = self._order[self._next : self._next + n]
            self._next += n
            out = []
            for k in picked:
                with Image.open(self.files[int(k)]) as im:
                    out.append(np.asarray(im.convert("RGB").resize((self.size, self.size), Image.BILINEAR)))
            return out
        h, w = self.photo.shape[:2]
        ys = rng.integers(0, h - self.size + 1, size=n)
        xs = rng.integers(0, w - self.size + 1, size=n)
        return [self.photo[y : y + self.size, x : x + self.size].copy() for y, x in zip(ys, xs, strict=True)]


def _fill_sources(category: str) -> list[np.ndarray]:
    """Anomaly-source textures for the Perlin fill: the other categories' photographs and skimage colour photos."""
    out = [_rgb(_skimage(c)) for c in ("brick", "grass", "gravel") if c != category]
    return out + [_rgb(_skimage(n)) for n in _FILL_EXTRA]


def _save(img: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, format="PNG")


def build_synthetic_mvtec(root: str | os.PathLike, categories: Sequence[str] = SYNTHETIC_CATEGORIES, *,
                          n_train: int = 60, n_test_good: int = 20, n_per_kind: int = 10,
                          kinds: Sequence[str] = DEFECT_KINDS, size: int = 128, seed: int = 0) -> Path:
    """Write the benchmark in MVTec AD's layout under ``root`` (``root/<category>/...``); returns ``root``."""
    out = Path(root)
    for k in kinds:
        if k not in DEFECT_KINDS:
            raise ValueError(f"unknown defect kind {k!r}; known: {DEFECT_KINDS}")
    for c_index, category in enumerate(categories):
        # One generator per category (seeded from seed and the category's position), so a category's
        # images do not depend on which other categories are built.
        rng = np.random.default_rng([seed, SYNTHETIC_CATEGORIES.index(category) if category in
                                     SYNTHETIC_CATEGORIES else 100 + c_index])
        base = out / category
        train = _Cropper(category, "train", size).crops(n_train, rng)
        for i, img in enumerate(train):
            _save(img, base / "train" / "good" / f"{i:03d}.png")
        test = _Cropper(category, "test", size)
        for i, img in enumerate(test.crops(n_test_good, rng)):
            _save(img, base / "test" / "good" / f"{i:03d}.png")
        fills = _fill_sources(category)
        for kind in kinds:
            for i, img in enumerate(test.crops(n_per_kind, rng)):
                source = fills[int(rng.integers(len(fills)))] if kind == "perlin" else None
                defect = add_defect(img, kind, rng, source=source)
                _save(defect.image, base / "test" / kind / f"{i:03d}.png")
                _save(defect.mask.astype(np.uint8) * 255, base / "ground_truth" / kind / f"{i:03d}_mask.png")
    return out


def _manifest(categories: Sequence[str], settings: dict) -> dict:
    return {"version": _VERSION, "categories": list(categories), **settings, "kinds": list(DEFECT_KINDS)}


def ensure_synthetic_mvtec(cache: str | os.PathLike, categories: Sequence[str] = SYNTHETIC_CATEGORIES,
                           **settings) -> Path:
    """The benchmark under ``cache/<settings key>``, built there on first use (seeded, so identical each time)."""
    full = {**SYNTHETIC_DEFAULTS, **settings}
    manifest = _manifest(categories, full)
    key = (f"v{_VERSION}-s{full['size']}-n{full['n_train']}-{full['n_test_good']}-{full['n_per_kind']}"
           f"-seed{full['seed']}")
    target = Path(cache) / key
    done = target / "manifest.json"
    if done.is_file() and json.loads(done.read_text()) == manifest:
        return target
    Path(cache).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
    try:
        build_synthetic_mvtec(tmp, categories, **full)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if target.exists():  # an older or partial build under the same key
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if not done.is_file():  # not a concurrent builder that won the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
