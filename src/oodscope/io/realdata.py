"""Readers for the real data sets available offline, and an exporter to image files.

* Fashion-MNIST (Xiao, Rasul & Vollgraf 2017; MIT licence) from the IDX files of the Debian package
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``), ``$OODSCOPE_FASHION_MNIST`` or ``root``.
* Simulated textile images from the PyPI package ``conformal-clip-data`` (MIT licence).
* scikit-learn's 8x8 digits (BSD-3 scikit-learn; data from the UCI optdigits set).
"""

from __future__ import annotations

import gzip
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .files import ImageFolder
from .sources import ArrayDataset, DatasetError, ImageSource, Relabel, Subset

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ID_CLASSES",
    "FASHION_MNIST_NEAR_OOD_CLASSES",
    "FashionMnistOOD",
    "TEXTILE_CLASSES",
    "digits",
    "fashion_mnist",
    "fashion_mnist_ood",
    "read_idx",
    "sanitize_class_name",
    "textiles",
    "write_image_folder",
]

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# The project's standard semantic split: the visually confusable upper-body garments and the boot are
# held out as near-OOD for a classifier trained on the remaining six classes.
FASHION_MNIST_ID_CLASSES: tuple[str, ...] = ("T-shirt/top", "Trouser", "Dress", "Sandal", "Sneaker", "Bag")
FASHION_MNIST_NEAR_OOD_CLASSES: tuple[str, ...] = ("Pullover", "Coat", "Shirt", "Ankle boot")

FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_ENV = "OODSCOPE_FASHION_MNIST"
_FM_PREFIX = {"test": "t10k", "train": "train"}

TEXTILE_CLASSES: tuple[str, ...] = ("nominal", "local", "global")

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike, *, expect_magic: int | None = None) -> np.ndarray:
    """Read an IDX file (gzip-compressed when it starts with the gzip signature).

    The magic number is ``0x0000 <dtype byte> <ndim byte>``; ``expect_magic`` checks it exactly (e.g.
    ``0x803`` for uint8 image stacks, ``0x801`` for uint8 label vectors).
    """
    p = Path(path)
    raw = p.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DatasetError(f"{str(p)!r}: corrupt gzip data ({e})") from e
    if len(raw) < 4:
        raise DatasetError(f"{str(p)!r}: too short to be an IDX file")
    (magic,) = struct.unpack(">I", raw[:4])
    if expect_magic is not None and magic != expect_magic:
        raise DatasetError(f"{str(p)!r}: IDX magic number 0x{magic:08x}, expected 0x{expect_magic:08x}")
    zero, code, ndim = magic >> 16, (magic >> 8) & 0xFF, magic & 0xFF
    if zero != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise DatasetError(f"{str(p)!r}: not an IDX file (magic 0x{magic:08x})")
    hdr = 4 + 4 * ndim
    if len(raw) < hdr:
        raise DatasetError(f"{str(p)!r}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:hdr])
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - hdr != expected:
        raise DatasetError(
            f"{str(p)!r}: IDX data has {len(raw) - hdr} bytes, header {shape} needs {expected}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=hdr).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def fashion_mnist(split: str = "test", root: str | os.PathLike | None = None) -> ArrayDataset:
    """Fashion-MNIST ``split`` ("test": 10 000 items, "train": 60 000) as 28x28 greyscale arrays.

    Files are looked up in ``root``, else ``$OODSCOPE_FASHION_MNIST``, else the Debian package folder.
    Both ``*-ubyte.gz`` and uncompressed ``*-ubyte`` names are accepted.
    """
    if split not in _FM_PREFIX:
        raise ValueError(f"split must be 'test' or 'train', got {split!r}")
    if root is not None:
        folder, origin = Path(root), "root argument"
    elif os.environ.get(FASHION_MNIST_ENV):
        folder, origin = Path(os.environ[FASHION_MNIST_ENV]), f"${FASHION_MNIST_ENV}"
    else:
        folder, origin = FASHION_MNIST_DEBIAN_DIR, "default Debian location"
    prefix = _FM_PREFIX[split]
    img_path = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
    lab_path = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
    if img_path is None or lab_path is None:
        raise FileNotFoundError(
            f"Fashion-MNIST {split} files ({prefix}-images-idx3-ubyte[.gz], {prefix}-labels-idx1-ubyte[.gz]) "
            f"not found in {str(folder)!r} ({origin}). Install them with `apt-get install "
            f"dataset-fashion-mnist`, or pass root=/set ${FASHION_MNIST_ENV} to a folder holding them."
        )
    images = read_idx(img_path, expect_magic=0x00000803)
    labels = read_idx(lab_path, expect_magic=0x00000801)
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(f"Fashion-MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DatasetError(f"Fashion-MNIST {split}: label {int(labels.max())} out of range 0..9")
    names = list(FASHION_MNIST_CLASSES)
    return ArrayDataset(images, labels.astype(np.int64), class_names=names, name=f"fashion_mnist-{split}")


def fashion_mnist_sample_root() -> Path:
    """The committed sample: first 80 train / 60 test images of every class (MIT, Zalando SE)."""
    return Path(__file__).resolve().parents[1] / "data" / "fashion-mnist-sample"


def fashion_mnist_root(allow_sample: bool = True) -> Path | None:
    """Where full Fashion-MNIST is ($OODSCOPE_FASHION_MNIST or the Debian package), else the
    committed sample when ``allow_sample``, else None."""
    env = os.environ.get(FASHION_MNIST_ENV)
    for folder in ([Path(env)] if env else []) + [FASHION_MNIST_DEBIAN_DIR]:
        if _find_idx(folder, "t10k-images-idx3-ubyte") and _find_idx(folder, "train-images-idx3-ubyte"):
            return folder
    return fashion_mnist_sample_root() if allow_sample else None


@dataclass(frozen=True)
class FashionMnistOOD:
    """The project's Fashion-MNIST OOD split.

    ``id``: the six ID classes, labels remapped to 0..5 (names in ``id_class_names``).
    ``near_ood``: the four held-out classes, keeping the original 10-class labels and names.
    """

    id: ImageSource
    near_ood: ImageSource
    id_class_names: list[str]


def _first_per_class(labels: np.ndarray, classes: Sequence[int], per_class: int | None) -> np.ndarray:
    picked = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        picked.append(idx if per_class is None else idx[:per_class])
    return np.sort(np.concatenate(picked))  # back to file order


def fashion_mnist_ood(
    split: str = "test", per_class: int | None = None, root: str | os.PathLike | None = None
) -> FashionMnistOOD:
    """The standard split: ID = {T-shirt/top, Trouser, Dress, Sandal, Sneaker, Bag},
    near-OOD = {Pullover, Coat, Shirt, Ankle boot}.

    ``per_class`` keeps the first ``n`` items of each class in file order; items stay in file order.
    """
    if per_class is not None and per_class <= 0:
        raise ValueError("per_class must be a positive integer or None")
    full = fashion_mnist(split, root=root)
    assert full.labels is not None
    pos = {c: k for k, c in enumerate(FASHION_MNIST_CLASSES)}
    id_orig = [pos[c] for c in FASHION_MNIST_ID_CLASSES]
    ood_orig = [pos[c] for c in FASHION_MNIST_NEAR_OOD_CLASSES]
    id_idx = _first_per_class(full.labels, id_orig, per_class)
    ood_idx = _first_per_class(full.labels, ood_orig, per_class)
    remap = np.full(len(FASHION_MNIST_CLASSES), -1, np.int64)
    remap[id_orig] = np.arange(len(id_orig))
    id_src = Relabel(Subset(full, id_idx), remap[full.labels[id_idx]], list(FASHION_MNIST_ID_CLASSES))
    return FashionMnistOOD(
        id=id_src, near_ood=Subset(full, ood_idx), id_class_names=list(FASHION_MNIST_ID_CLASSES)
    )


def textiles(kind: str = "all") -> ImageSource:
    """Simulated 250x250 textile JPEGs from ``conformal-clip-data``.

    Classes (in this index order): nominal (1000), local defect (500), global defect (500). ``kind``
    selects one of them as a :class:`Subset` that keeps the 3-class labels, or ``"all"``.
    """
    if kind != "all" and kind not in TEXTILE_CLASSES:
        raise ValueError(f"kind must be 'all' or one of {TEXTILE_CLASSES}, got {kind!r}")
    try:
        import conformal_clip_data
    except ImportError as e:
        raise ImportError(
            "textiles() needs the PyPI package 'conformal-clip-data': pip install conformal-clip-data "
            "(or pip install 'oodscope[data]')"
        ) from e
    folder = ImageFolder(conformal_clip_data.textile_simulated_root(), class_names=list(TEXTILE_CLASSES))
    if kind == "all":
        return folder
    assert folder.labels is not None
    return Subset(folder, np.flatnonzero(folder.labels == TEXTILE_CLASSES.index(kind)))


def digits() -> ArrayDataset:
    """scikit-learn's 1797 8x8 digits, values 0..16 scaled to uint8 by ``round(v * 255 / 16)``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(np.asarray(d.images, dtype=np.float64) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return ArrayDataset(images, np.asarray(d.target, dtype=np.int64), [str(k) for k in range(10)], "digits")


_UNSAFE = re.compile(r"[^A-Za-z0-9._ +-]+")
_FORMATS = {"png": ("PNG", "png"), "jpg": ("JPEG", "jpg"), "jpeg": ("JPEG", "jpg"), "bmp": ("BMP", "bmp"),
            "webp": ("WEBP", "webp"), "tif": ("TIFF", "tif"), "tiff": ("TIFF", "tif"), "gif": ("GIF", "gif")}


def sanitize_class_name(name: str) -> str:
    """A safe folder name: runs of characters outside ``[A-Za-z0-9._ +-]`` become ``_``; no leading dot.

    E.g. ``"T-shirt/top" -> "T-shirt_top"``. An empty result becomes ``"_"``.
    """
    s = _UNSAFE.sub("_", str(name)).strip()
    if s.startswith("."):
        s = "_" + s[1:]
    return s or "_"


def write_image_folder(
    source: ImageSource,
    root: str | os.PathLike,
    *,
    fmt: str = "png",
    indices: Sequence[int] | np.ndarray | None = None,
) -> Path:
    """Write items of ``source`` as image files and return ``root``.

    Labeled sources get an ImageFolder layout ``root/<class>/<index>.<ext>`` with one folder per class
    (created even if empty), named by :func:`sanitize_class_name` (``_<k>`` appended on a clash) or by
    the zero-padded label when the source has no class names; items with label ``-1`` go directly in
    ``root``. Unlabeled sources are written flat. ``<index>`` is the zero-padded index in ``source``.
    Existing files with the same names are overwritten.
    """
    key = fmt.lower().lstrip(".")
    if key not in _FORMATS:
        raise ValueError(f"fmt must be one of {sorted(_FORMATS)}, got {fmt!r}")
    pil_format, ext = _FORMATS[key]
    out = Path(root)
    out.mkdir(parents=True, exist_ok=True)
    idx = np.arange(len(source)) if indices is None else np.asarray(indices, dtype=np.int64)
    width = max(6, len(str(max(len(source) - 1, 0))))

    folders: dict[int, Path] = {}
    if source.labels is not None:
        if source.class_names is not None:
            used: set[str] = set()
            for k, c in enumerate(source.class_names):
                name = sanitize_class_name(c)
                if name.lower() in used:
                    name = f"{name}_{k}"
                used.add(name.lower())
                folders[k] = out / name
        else:
            top = int(source.labels.max()) if source.labels.size else 0
            w = len(str(max(top, 0)))
            folders = {k: out / f"{k:0{w}d}" for k in range(top + 1)}
        for f in folders.values():
            f.mkdir(exist_ok=True)

    save_kw = {"quality": 95} if pil_format in ("JPEG", "WEBP") else {}
    for i in idx.tolist():
        img = source.load(i)
        label = -1 if source.labels is None else int(source.labels[i])
        folder = folders.get(label, out)
        j = i + len(source) if i < 0 else i
        img.save(folder / f"{j:0{width}d}.{ext}", format=pil_format, **save_kw)
    return out
