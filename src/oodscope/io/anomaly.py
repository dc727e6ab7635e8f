"""Anomaly-detection data: images with image labels (0 good, 1 defective) and ground-truth masks.

Readers for the published layouts and for a custom folder layout, all returning an
:class:`AnomalySource` (an :class:`~oodscope.io.ImageSource` whose items also carry a defect type and
a mask path), so every command that takes images takes them unchanged:

* :func:`mvtec_category` -- MVTec AD (Bergmann et al., CVPR 2019) and MVTec-like layouts (MPDD,
  Jezek et al., ICUMT 2021; the offline synthetic benchmark): ``<category>/train/good/*``,
  ``<category>/test/<good|defect type>/*``, ``<category>/ground_truth/<defect type>/<stem>_mask.png``;
* :func:`visa_split` -- VisA (Zou et al., ECCV 2022): ``split_csv/1cls.csv`` (object, split, label,
  image, mask) over ``<object>/Data/Images/{Normal,Anomaly}`` and ``<object>/Data/Masks/Anomaly``;
* :func:`anomaly_folder` -- a train folder of good images, a test folder of good images, a test
  folder of defective images (sub-folders = defect types), optionally a mask folder with a naming
  rule (default ``{stem}_mask.png``, MVTec's; the mask's sub-folders mirror the defect folder's).

Masks are checked when the source is built: a mask the layout names must exist and have its
image's size, else :class:`MaskError` names the file (and, for a folder with a mask rule, a mask
matching no image is an error too: it usually means the rule is wrong). A defective image whose
layout names no mask (a custom folder without a mask folder, MVTec without ``ground_truth/``) has
none: ``has_masks`` is False and asking for its mask raises, naming the image. A good image's mask
is all False. Mask files are binarised as ``value > 0`` (MVTec and VisA store 0/255).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .files import _walk_images
from .images import read_image_bytes
from .sources import Concat, DatasetError, ImageSource, Relabel, Subset

__all__ = [
    "ANOMALY_CLASSES",
    "AnomalySource",
    "AnomalySplit",
    "MaskError",
    "anomaly_folder",
    "find_anomaly_source",
    "load_mask",
    "mvtec_category",
    "visa_split",
]

ANOMALY_CLASSES: tuple[str, str] = ("good", "defect")
DEFAULT_MASK_RULE = "{stem}_mask.png"


class MaskError(DatasetError):
    """A ground-truth mask is missing, unreadable, or does not match its image (the message names the file)."""


def _size_of(path: Path, what: str) -> tuple[int, int]:
    """(width, height) from the file header (no pixel decoding); MaskError naming the file if unreadable."""
    try:
        with Image.open(path) as img:
            return img.size
    except FileNotFoundError:
        raise MaskError(f"{what} {str(path)!r} does not exist") from None
    except (OSError, ValueError) as err:
        raise MaskError(f"{what} {str(path)!r} cannot be read: {err}") from None


class AnomalySource(ImageSource):
    """Image files with labels 0 (good) / 1 (defect), a defect type and an optional mask path each.

    ``defect_types[i]``: ``"good"`` for good images, else the defect type (its folder name, or
    ``"defect"``). ``mask_paths[i]``: the mask file, or None (good images; defective images whose
    layout names no mask). ``check=True`` (default) verifies every named mask against its image.
    """

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], defect_types: Sequence[str],
                 mask_paths: Sequence[Path | None], *, name: str = "anomaly", check: bool = True) -> None:
        n = len(paths)
        if not n:
            raise DatasetError(f"{name}: no images")
        if not (len(labels) == len(defect_types) == len(mask_paths) == n):
            raise DatasetError(f"{name}: {n} images but {len(labels)} labels, {len(defect_types)} defect types "
                               f"and {len(mask_paths)} mask paths")
        self.paths = [Path(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64)
        if not np.isin(self.labels, (0, 1)).all():
            raise DatasetError(f"{name}: image labels must be 0 (good) or 1 (defect)")
        self.class_names = list(ANOMALY_CLASSES)
        self.defect_types = [str(t) for t in defect_types]
        self.mask_paths = [None if m is None else Path(m) for m in mask_paths]
        self.name = name
        for i, m in enumerate(self.mask_paths):
            if m is not None and self.labels[i] == 0:
                raise DatasetError(f"{name}: good image {str(self.paths[i])!r} was given a mask {str(m)!r}")
        if check:
            self.check_masks()

    def __len__(self) -> int:
        return len(self.paths)

    def item_id(self, i: int) -> str:
        return str(self.paths[self._index(i)])

    def read(self, i: int) -> bytes:
        return read_image_bytes(self.paths[self._index(i)])

    @property
    def has_masks(self) -> bool:
        """Whether every defective image has a mask (pixel metrics need it)."""
        return all(m is not None for m, y in zip(self.mask_paths, self.labels, strict=True) if y == 1)

    def check_masks(self) -> None:
        """Every named mask exists and has its image's size (headers only); MaskError names the file."""
        for img, mask in zip(self.paths, self.mask_paths, strict=True):
            if mask is None:
                continue
            want = _size_of(img, "image")
            got = _size_of(mask, "mask")
            if got != want:
                raise MaskError(f"mask {str(mask)!r} is {got[0]}x{got[1]} but its image {str(img)!r} is "
                                f"{want[0]}x{want[1]} (width x height)")

    def mask(self, i: int, size: tuple[int, int] | None = None) -> np.ndarray:
        """The boolean mask (H, W) of item ``i`` (all False for a good image).

        ``size=(H, W)`` resizes it with nearest-neighbour sampling (to compare with maps of that size).
        Raises :class:`MaskError` for a defective image without a mask.
        """
        j = self._index(i)
        path = self.mask_paths[j]
        if path is None:
            if self.labels[j] == 1:
                raise MaskError(f"defective image {str(self.paths[j])!r} has no mask (pixel metrics need masks "
                                "for every defective image)")
            w, h = _size_of(self.paths[j], "image")
            return np.zeros(size if size is not None else (h, w), dtype=bool)
        try:
            with Image.open(path) as img:
                m = img.convert("L")
                if size is not None and m.size != (size[1], size[0]):
                    m = m.resize((size[1], size[0]), Image.NEAREST)
                return np.asarray(m) > 0
        except (OSError, ValueError) as err:
            raise MaskError(f"mask {str(path)!r} cannot be read: {err}") from None

    def masks(self, size: tuple[int, int] | None = None) -> np.ndarray:
        """All masks as one (N, H, W) boolean array (the images must share a size, or pass ``size``)."""
        out = [self.mask(i, size) for i in range(len(self))]
        shapes = {m.shape for m in out}
        if len(shapes) > 1:
            raise MaskError(f"{self.name}: masks have different sizes {sorted(shapes)}; pass size=(H, W)")
        return np.stack(out)


@dataclass(frozen=True)
class AnomalySplit:
    """A fit set of good images and a test set of good and defective ones."""

    train: AnomalySource
    test: AnomalySource


# ------------------------------------------------------------------------------------------ readers


def _images(folder: Path) -> list[Path]:
    return _walk_images(folder, os.path.realpath(folder), follow_symlinks=False)


def mvtec_category(root: str | os.PathLike, *, check: bool = True) -> AnomalySplit:
    """One category folder in MVTec AD's layout (MVTec AD, MPDD, the synthetic benchmark).

    ``train/good`` -> label 0; ``test/good`` -> 0; every other ``test/<type>`` -> 1 with defect type
    ``<type>`` and mask ``ground_truth/<type>/<stem>_mask.png``. Without a ``ground_truth`` folder
    the test set has image labels only (``has_masks`` False); with one, a missing mask is an error.
    """
    base = Path(root).expanduser()
    train_dir, test_dir, gt_dir = base / "train" / "good", base / "test", base / "ground_truth"
    for need in (train_dir, test_dir):
        if not need.is_dir():
            raise FileNotFoundError(f"{need} not found (an MVTec-layout category has train/good and test/<type>)")
    train = _images(train_dir)
    if not train:
        raise DatasetError(f"{train_dir} has no images")
    paths: list[Path] = []
    labels: list[int] = []
    types: list[str] = []
    masks: list[Path | None] = []
    for sub in sorted(p for p in test_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for img in _images(sub):
            good = sub.name == "good"
            paths.append(img)
            labels.append(0 if good else 1)
            types.append(sub.name)
            if good or not gt_dir.is_dir():
                masks.append(None)
            else:
                mask = gt_dir / sub.name / img.relative_to(sub).parent / f"{img.stem}_mask.png"
                if not mask.is_file():
                    raise MaskError(f"mask {str(mask)!r} of defective image {str(img)!r} does not exist")
                masks.append(mask)
    if not paths:
        raise DatasetError(f"{test_dir} has no images")
    name = base.name
    return AnomalySplit(
        train=AnomalySource(train, [0] * len(train), ["good"] * len(train), [None] * len(train),
                            name=f"{name}/train", check=check),
        test=AnomalySource(paths, labels, types, masks, name=f"{name}/test", check=check))


_VISA_NORMAL = ("normal", "good")


def visa_split(root: str | os.PathLike, category: str | None = None, split: str | None = None, *,
               table: str = "split_csv/1cls.csv", check: bool = True) -> AnomalySource:
    """VisA's split table (default the 1-class split): rows ``object, split, label, image, mask``.

    Paths are relative to ``root`` (or ``root/VisA_20220922``). ``label`` "normal" -> 0, anything else
    -> 1 (defect type "anomaly"); an anomalous row's mask is ``mask`` (empty = no mask).
    """
    top = Path(root).expanduser()
    base = top / "VisA_20220922" if (top / "VisA_20220922").is_dir() else top
    csv_path = base / table
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path} not found")
    paths: list[Path] = []
    labels: list[int] = []
    masks: list[Path | None] = []
    with open(csv_path, newline="") as fh:
        for row in csv.DictReader(fh):
            if (category is not None and row["object"] != category) or (split is not None and row["split"] != split):
                continue
            normal = row["label"].strip().lower() in _VISA_NORMAL
            paths.append(base / row["image"])
            labels.append(0 if normal else 1)
            rel = (row.get("mask") or "").strip()
            masks.append(None if normal or not rel else base / rel)
    if not paths:
        raise DatasetError(f"{csv_path}: no rows for object={category!r}, split={split!r}")
    types = ["good" if y == 0 else "anomaly" for y in labels]
    return AnomalySource(paths, labels, types, masks, name=f"visa/{category or 'all'}/{split or 'all'}", check=check)


def _mask_for(rule: str, image: Path) -> str:
    return rule.format(stem=image.stem, name=image.name, ext=image.suffix.lstrip("."))


def anomaly_folder(train: str | os.PathLike, test_good: str | os.PathLike, test_defect: str | os.PathLike, *,
                   masks: str | os.PathLike | None = None, mask_rule: str = DEFAULT_MASK_RULE,
                   check: bool = True) -> AnomalySplit:
    """A custom layout: folders of good training images, good test images and defective test images.

    Images directly in ``test_defect`` get defect type ``"defect"``; images in a sub-folder get the
    sub-folder's name. With ``masks``, the mask of ``test_defect/<rel>/<file>`` is
    ``masks/<rel>/<mask_rule>`` where ``mask_rule`` may use ``{stem}`` (file name without extension),
    ``{name}`` (with it) and ``{ext}``; the default ``{stem}_mask.png`` is MVTec's rule, ``{name}``
    gives a mask with the image's own file name. Every defective image must then have its mask, and
    every image file in ``masks`` must be some image's mask (MaskError naming the file otherwise).
    """
    folders = {"train": Path(train).expanduser(), "test_good": Path(test_good).expanduser(),
               "test_defect": Path(test_defect).expanduser()}
    found: dict[str, list[Path]] = {}
    for key, folder in folders.items():
        if not folder.is_dir():
            raise FileNotFoundError(f"{key} folder {str(folder)!r} does not exist")
        found[key] = _images(folder)
        if not found[key]:
            raise DatasetError(f"{key} folder {str(folder)!r} has no images")
    defect_dir = folders["test_defect"]
    mask_dir = None if masks is None else Path(masks).expanduser()
    if mask_dir is not None and not mask_dir.is_dir():
        raise FileNotFoundError(f"mask folder {str(mask_dir)!r} does not exist")
    types, mask_paths = [], []
    for img in found["test_defect"]:
        rel = img.relative_to(defect_dir)
        types.append(rel.parts[0] if len(rel.parts) > 1 else "defect")
        if mask_dir is None:
            mask_paths.append(None)
            continue
        mask = mask_dir / rel.parent / _mask_for(mask_rule, img)
        if not mask.is_file():
            raise MaskError(f"mask {str(mask)!r} of defective image {str(img)!r} does not exist "
                            f"(mask rule {mask_rule!r} under {str(mask_dir)!r})")
        mask_paths.append(mask)
    if mask_dir is not None:
        used = {os.path.realpath(m) for m in mask_paths}
        orphans = [p for p in _images(mask_dir) if os.path.realpath(p) not in used]
        if orphans:
            raise MaskError(f"{len(orphans)} mask file(s) match no defective image under the rule {mask_rule!r}, "
                            f"e.g. {str(orphans[0])!r}")
    good = found["test_good"]
    n_tr = len(found["train"])
    return AnomalySplit(
        train=AnomalySource(found["train"], [0] * n_tr, ["good"] * n_tr, [None] * n_tr, name="train", check=check),
        test=AnomalySource(good + found["test_defect"], [0] * len(good) + [1] * len(types),
                           ["good"] * len(good) + types, [None] * len(good) + mask_paths, name="test", check=check))


# ------------------------------------------------------------------------------- through wrappers


def find_anomaly_source(source: ImageSource, i: int) -> tuple[AnomalySource, int] | None:
    """The :class:`AnomalySource` and index that item ``i`` of ``source`` comes from, through
    Subset / Relabel / Concat; None if it comes from no AnomalySource."""
    j = source._index(i)
    while True:
        if isinstance(source, AnomalySource):
            return source, j
        if isinstance(source, Subset):
            source, j = source.source, int(source.indices[j])
        elif isinstance(source, Relabel):
            source = source.source
        elif isinstance(source, Concat):
            source, j = source._locate(j)
        else:
            return None


def load_mask(source: ImageSource, i: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """The mask of item ``i`` of any source built on an AnomalySource (see :meth:`AnomalySource.mask`)."""
    found = find_anomaly_source(source, i)
    if found is None:
        raise MaskError(f"item {source.item_id(i)!r} comes from a source without masks ({type(source).__name__})")
    return found[0].mask(found[1], size)
