"""Image sources: the :class:`ImageSource` contract, in-memory arrays and the wrappers over other sources.

Every source exposes ``read(i)`` (the raw encoded bytes, which a feature cache hashes) separately from
``decode(i, raw)`` (bytes -> RGB ``PIL.Image``), so a cache hit never pays for decoding. The file-based
sources (folders, list files, ``open_dataset``) are in :mod:`oodscope.io.files`.
"""

from __future__ import annotations

import abc
import bisect
import operator
import struct
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image

from .images import DEFAULT_MAX_PIXELS, ImageLoadError, decode_image

__all__ = [
    "ArrayDataset",
    "Concat",
    "DatasetError",
    "ImageSource",
    "Relabel",
    "Subset",
    "decode_array_bytes",
]


class DatasetError(ValueError):
    """A dataset specification is invalid (missing root, empty dataset, malformed list file, ...)."""


class ImageSource(abc.ABC):
    """An indexable collection of encoded images with optional integer labels.

    ``labels``: int64 array, one class index per item, ``-1`` = unknown; ``None`` when unlabeled.
    ``class_names``: names for the class indices, or ``None``.
    ``background`` / ``max_pixels``: passed to :func:`~oodscope.io.images.decode_image`; set them on an
    instance to change how that source decodes.
    """

    labels: np.ndarray | None = None
    class_names: list[str] | None = None
    background: tuple[int, int, int] = (255, 255, 255)
    max_pixels: int | None = DEFAULT_MAX_PIXELS

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def item_id(self, i: int) -> str:
        """Stable, human-readable id of item ``i`` (the file path, or ``"<name>:<i>"`` for arrays)."""

    @abc.abstractmethod
    def read(self, i: int) -> bytes:
        """Raw encoded bytes of item ``i``; raises :class:`ImageLoadError` when unreadable."""

    def decode(self, i: int, raw: bytes) -> Image.Image:
        """Decode the bytes returned by :meth:`read` into an RGB image; raises :class:`ImageLoadError`."""
        return decode_image(raw, path=self.item_id(i), background=self.background, max_pixels=self.max_pixels)

    def load(self, i: int) -> Image.Image:
        return self.decode(i, self.read(i))

    def __iter__(self) -> Iterator[Image.Image]:
        for i in range(len(self)):
            yield self.load(i)

    def _index(self, i: int) -> int:
        """Validate an index (numpy ints and negative indices accepted) and return it as a plain int."""
        n = len(self)
        j = operator.index(i)  # TypeError for floats/strings, accepts numpy integers
        if j < 0:
            j += n
        if not 0 <= j < n:
            raise IndexError(f"index {i} out of range for {type(self).__name__} of length {n}")
        return j

    def __repr__(self) -> str:
        nc = None if self.class_names is None else len(self.class_names)
        return f"{type(self).__name__}(n={len(self)}, labeled={self.labels is not None}, classes={nc})"


def as_labels(labels: object, n: int, class_names: Sequence[str] | None) -> np.ndarray:
    """``labels`` checked as ``n`` int64 class indices (``-1`` = unknown) below ``len(class_names)``."""
    arr = np.asarray(labels)
    if arr.shape != (n,):
        raise DatasetError(f"labels must have shape ({n},), got {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise DatasetError(f"labels must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < -1:
        raise DatasetError("labels must be >= -1 (-1 means unknown)")
    if class_names is not None and arr.size and arr.max() >= len(class_names):
        raise DatasetError(f"label {int(arr.max())} out of range for {len(class_names)} class names")
    return arr


# -------------------------------------------------------------------------------------------- arrays

_ARRAY_MAGIC = b"OODSARR1"
_ARRAY_HEADER = struct.Struct("<8sIII")  # magic, height, width, channels


class ArrayDataset(ImageSource):
    """In-memory ``uint8`` images: ``(N, H, W)`` greyscale or ``(N, H, W, 3)`` RGB.

    ``read(i)`` returns a compact encoding (16-byte header with magic/height/width/channels, then the raw
    pixels in C order), so equal pixels give equal bytes and content hashing works like for files.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: Sequence[int] | np.ndarray | None = None,
        class_names: Sequence[str] | None = None,
        name: str = "array",
    ) -> None:
        arr = np.asarray(images)
        if arr.dtype != np.uint8:
            raise DatasetError(f"ArrayDataset needs uint8 images, got dtype {arr.dtype}")
        if arr.ndim == 4 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if not (arr.ndim == 3 or (arr.ndim == 4 and arr.shape[-1] == 3)):
            raise DatasetError(f"ArrayDataset needs shape (N,H,W) or (N,H,W,3), got {arr.shape}")
        if arr.shape[0] == 0:
            raise DatasetError("ArrayDataset is empty")
        if arr.shape[1] == 0 or arr.shape[2] == 0:
            raise DatasetError(f"ArrayDataset images have zero size: {arr.shape}")
        self.images = np.ascontiguousarray(arr)
        self.name = str(name)
        self.class_names = [str(c) for c in class_names] if class_names is not None else None
        self.labels = None if labels is None else as_labels(labels, arr.shape[0], self.class_names)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def item_id(self, i: int) -> str:
        return f"{self.name}:{self._index(i)}"

    def read(self, i: int) -> bytes:
        a = self.images[self._index(i)]
        c = 1 if a.ndim == 2 else 3
        return _ARRAY_HEADER.pack(_ARRAY_MAGIC, a.shape[0], a.shape[1], c) + a.tobytes()

    def decode(self, i: int, raw: bytes) -> Image.Image:
        return decode_array_bytes(raw, path=self.item_id(i))


def decode_array_bytes(raw: bytes, *, path: str = "<bytes>") -> Image.Image:
    """Inverse of :meth:`ArrayDataset.read`: an RGB image from the compact array encoding."""
    hs = _ARRAY_HEADER.size
    if len(raw) < hs:
        raise ImageLoadError(path, "array record shorter than its header")
    magic, h, w, c = _ARRAY_HEADER.unpack_from(raw)
    if magic != _ARRAY_MAGIC or c not in (1, 3):
        raise ImageLoadError(path, "not an oodscope array record")
    if len(raw) != hs + h * w * c:
        raise ImageLoadError(path, f"array record has {len(raw) - hs} pixel bytes, expected {h * w * c}")
    a = np.frombuffer(raw, dtype=np.uint8, offset=hs)
    if c == 1:
        return Image.fromarray(a.reshape(h, w).copy(), mode="L").convert("RGB")
    return Image.fromarray(a.reshape(h, w, 3).copy(), mode="RGB")


# ------------------------------------------------------------------------------------------ wrappers


class Subset(ImageSource):
    """Items ``indices`` of ``source`` (in that order; repeats allowed); ids are the source's ids."""

    def __init__(self, source: ImageSource, indices: Sequence[int] | np.ndarray) -> None:
        idx = np.asarray(indices)
        if idx.ndim != 1:
            raise DatasetError("Subset indices must be 1-D")
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            if idx.dtype == bool:
                raise DatasetError("Subset indices must be integers (use np.flatnonzero for a mask)")
            raise DatasetError(f"Subset indices must be integers, got dtype {idx.dtype}")
        idx = idx.astype(np.int64)
        n = len(source)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"Subset index out of range for a source of length {n}")
        self.source = source
        self.indices = np.where(idx < 0, idx + n, idx)
        if self.indices.size == 0:
            raise DatasetError("Subset is empty")
        self.labels = None if source.labels is None else source.labels[self.indices]
        self.class_names = None if source.class_names is None else list(source.class_names)

    def __len__(self) -> int:
        return int(self.indices.size)

    def _src(self, i: int) -> int:
        return int(self.indices[self._index(i)])

    def item_id(self, i: int) -> str:
        return self.source.item_id(self._src(i))

    def read(self, i: int) -> bytes:
        return self.source.read(self._src(i))

    def decode(self, i: int, raw: bytes) -> Image.Image:
        return self.source.decode(self._src(i), raw)


class Relabel(ImageSource):
    """``source`` with replacement ``labels`` (length ``len(source)``; ``None`` = unlabeled) and names."""

    def __init__(
        self,
        source: ImageSource,
        labels: Sequence[int] | np.ndarray | None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        self.source = source
        self.class_names = [str(c) for c in class_names] if class_names is not None else None
        self.labels = None if labels is None else as_labels(labels, len(source), self.class_names)

    def __len__(self) -> int:
        return len(self.source)

    def item_id(self, i: int) -> str:
        return self.source.item_id(i)

    def read(self, i: int) -> bytes:
        return self.source.read(i)

    def decode(self, i: int, raw: bytes) -> Image.Image:
        return self.source.decode(i, raw)


class Concat(ImageSource):
    """Sources one after the other; ids are the sources' ids.

    Labels: ``None`` if every source is unlabeled. Otherwise items of unlabeled sources get ``-1``. When
    the labeled sources all have class names, classes are merged **by name** (first source's order, then
    new names in order of appearance) and labels remapped; when none has class names, the integer labels
    are kept as they are; mixing named and unnamed labeled sources is an error.
    """

    def __init__(self, sources: Sequence[ImageSource]) -> None:
        self.sources = list(sources)
        if not self.sources:
            raise DatasetError("Concat needs at least one source")
        lengths = [len(s) for s in self.sources]
        self._starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64).tolist()
        labeled = [s for s in self.sources if s.labels is not None]
        if not labeled:
            self.labels, self.class_names = None, None
            return
        named = [s.class_names is not None for s in labeled]
        if any(named) and not all(named):
            raise DatasetError("Concat: labeled sources mix named classes and bare integer labels")
        parts = []
        if all(named):
            names: list[str] = []
            index: dict[str, int] = {}
            for s in labeled:
                for c in s.class_names:  # type: ignore[union-attr]
                    if c not in index:
                        index[c] = len(names)
                        names.append(c)
            for s in self.sources:
                if s.labels is None:
                    parts.append(np.full(len(s), -1, np.int64))
                else:
                    remap = np.asarray([index[c] for c in s.class_names] + [-1], dtype=np.int64)
                    parts.append(remap[s.labels])  # label -1 picks the trailing -1
            self.class_names = names
        else:
            for s in self.sources:
                parts.append(np.full(len(s), -1, np.int64) if s.labels is None else s.labels.astype(np.int64))
            self.class_names = None
        self.labels = np.concatenate(parts)

    def __len__(self) -> int:
        return self._starts[-1]

    def _locate(self, i: int) -> tuple[ImageSource, int]:
        j = self._index(i)
        k = bisect.bisect_right(self._starts, j) - 1
        return self.sources[k], j - self._starts[k]

    def item_id(self, i: int) -> str:
        s, j = self._locate(i)
        return s.item_id(j)

    def read(self, i: int) -> bytes:
        s, j = self._locate(i)
        return s.read(j)

    def decode(self, i: int, raw: bytes) -> Image.Image:
        s, j = self._locate(i)
        return s.decode(j, raw)
