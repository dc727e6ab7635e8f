"""A source of corrupted images: every image of another source corrupted at one severity."""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

from oodscope.evaluation.corruptions.functions import REFERENCE_SIZE, check_corruption, corrupt
from oodscope.io.sources import ArrayDataset, ImageSource, decode_array_bytes


def encode_pixels(image: Image.Image) -> bytes:
    """The compact raw-pixel record of :class:`~oodscope.io.ArrayDataset` for an ``L``/``RGB`` image."""
    arr = np.asarray(image.convert("RGB") if image.mode not in ("L", "RGB") else image, dtype=np.uint8)
    return ArrayDataset(arr[None]).read(0)


class CorruptedSource(ImageSource):
    """``source`` with every image corrupted by ``name`` at ``severity``.

    ``read(i)`` decodes the source image, corrupts it and returns the raw-pixel record of the result
    (the :class:`~oodscope.io.ArrayDataset` encoding), so the feature cache keys on the corrupted
    pixels: every corruption / severity / seed has its own cache entries, and a repeated run is a
    cache hit. Severity 0 returns the source's own bytes, so clean features are shared with every
    other use of the source. The random draws of image ``i`` are seeded by ``seed`` and the content
    of the source image (not its position), so a subset or a re-ordering corrupts an image the same way.

    ``work_size``: images whose shorter side is below it are first upsampled (bicubic) so that the
    shorter side equals it, as ImageNet-C corrupts the 224-pixel network input; ``None`` corrupts at
    the native size (spatial parameters are then scaled to the image, see :func:`corrupt`).
    """

    def __init__(
        self, source: ImageSource, name: str, severity: int, seed: int = 0, *, work_size: int | None = REFERENCE_SIZE
    ) -> None:
        check_corruption(name, severity)
        if work_size is not None and work_size < 1:
            raise ValueError("work_size must be a positive number of pixels or None")
        self.source = source
        self.name = name
        self.severity = int(severity)
        self.seed = int(seed)
        self.work_size = work_size
        self.labels = source.labels
        self.class_names = source.class_names
        self.background = source.background
        self.max_pixels = source.max_pixels

    def __len__(self) -> int:
        return len(self.source)

    def item_id(self, i: int) -> str:
        base = self.source.item_id(i)
        return base if self.severity == 0 else f"{base}#{self.name}@{self.severity}"

    def corrupted_image(self, i: int, raw: bytes | None = None) -> Image.Image:
        """The corrupted image ``i`` (``raw``: the source's bytes, when already read)."""
        raw = self.source.read(i) if raw is None else raw
        image = self.source.decode(i, raw)
        if self.severity == 0:
            return image
        if self.work_size is not None and min(image.size) < self.work_size:
            w, h = image.size
            factor = self.work_size / min(w, h)
            image = image.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.Resampling.BICUBIC)
        content = int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")
        return corrupt(image, self.name, self.severity, seed=(self.seed, content))

    def read(self, i: int) -> bytes:
        raw = self.source.read(i)
        if self.severity == 0:
            return raw
        return encode_pixels(self.corrupted_image(i, raw))

    def decode(self, i: int, raw: bytes) -> Image.Image:
        if self.severity == 0:
            return self.source.decode(i, raw)
        return decode_array_bytes(raw, path=self.item_id(i))

    def __repr__(self) -> str:
        return f"CorruptedSource({self.source!r}, {self.name!r}, severity={self.severity}, seed={self.seed})"


__all__ = ["CorruptedSource", "encode_pixels"]
