"""Robust image decoding: any common file/mode in, one RGB ``PIL.Image`` out, or one clear error.

Conversion rules (see ``docs/io.md``):

* EXIF orientation is applied (``ImageOps.exif_transpose``); unreadable EXIF is ignored.
* Multi-frame files (animated GIF/WebP, multi-page TIFF): the first frame only.
* ``1``/``L``/``P``/``RGB``/``CMYK``/``YCbCr``/... -> Pillow's ``convert("RGB")``.
* Anything with alpha (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``/``La``, and ``P``/``L``/``RGB``
  with a ``transparency`` entry, e.g. a GIF/PNG transparent palette index or PNG colour key) is
  alpha-composited over ``background``.
* ``I;16*`` (16-bit): ``round(v / 257)``, i.e. the full 0..65535 range maps linearly onto 0..255.
* ``I`` (32-bit int): if every value lies in 0..65535 it is treated as 16-bit (same rule; this is how
  some Pillow versions/plugins expose 16-bit PNG/TIFF), otherwise min-max scaled to 0..255.
* ``F`` (float): if every finite value lies in [0, 1], ``round(v * 255)``; otherwise min-max scaled.
  NaN/inf become 0. A constant image that needs min-max scaling becomes all 0.

Oversized images: an image with more than ``max_pixels`` pixels (width * height, read from the header
before any pixel is decoded) is refused with one message naming the pixel count and the limit,
whichever guard caught it (ours, or Pillow's hard limit of ``2 * PIL.Image.MAX_IMAGE_PIXELS`` for
the largest sizes): see :func:`too_many_pixels`. On the command line the limit is ``--max-pixels``.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImageLoadError",
    "decode_image",
    "is_image_path",
    "load_image",
    "read_image_bytes",
    "to_rgb",
    "too_many_pixels",
]

# Same value as Pillow's default ``Image.MAX_IMAGE_PIXELS`` (~ 1 GiB of 24-bit pixels / 4), but enforced
# by us with an exception instead of Pillow's warning.
DEFAULT_MAX_PIXELS: int = 89_478_485

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
)

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


class ImageLoadError(Exception):
    """An image could not be read or decoded. ``path`` names the file (or ``"<bytes>"``)."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = str(path)
        self.reason = str(reason)
        super().__init__(f"cannot load image {self.path!r}: {self.reason}")

    def __reduce__(self) -> tuple:
        # Keeps the exception transferable between worker processes despite the custom __init__.
        return (type(self), (self.path, self.reason))


_PILLOW_PIXELS = re.compile(r"\((\d+) pixels\)")


def too_many_pixels(path: str, pixels: int | None, limit: int) -> ImageLoadError:
    """The one error for an oversized image: its pixel count and the limit (``max_pixels``)."""
    count = f"{pixels:,} pixels" if pixels else "too many pixels"
    return ImageLoadError(path, f"image too large: {count}, more than the limit of {limit:,} pixels "
                                "(max_pixels; --max-pixels on the command line)")


def _pillow_bomb(path: str, err: Exception, max_pixels: int | None) -> ImageLoadError:
    """Pillow's DecompressionBombError (an image above its hard limit) as :func:`too_many_pixels`."""
    found = _PILLOW_PIXELS.search(str(err))
    pixels = int(found.group(1)) if found else None
    hard = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None
    limit = max_pixels if max_pixels is not None and (hard is None or max_pixels < hard) else hard
    return too_many_pixels(path, pixels, limit if limit is not None else 0)


def is_image_path(path: str | os.PathLike) -> bool:
    """True when the file name ends with one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


def read_image_bytes(path: str | os.PathLike) -> bytes:
    """Read a file's raw bytes, turning every filesystem failure into :class:`ImageLoadError`."""
    p = os.fspath(path)
    try:
        with open(p, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise ImageLoadError(p, "file not found") from None
    except IsADirectoryError:
        raise ImageLoadError(p, "is a directory, not an image file") from None
    except PermissionError:
        raise ImageLoadError(p, "permission denied") from None
    except OSError as e:
        raise ImageLoadError(p, f"cannot read file: {e.strerror or e}") from e


def _scale_16bit(a: np.ndarray) -> np.ndarray:
    # 65535 / 257 == 255 exactly, so the full 16-bit range maps onto the full 8-bit range.
    return np.rint(a.astype(np.float64) / 257.0).astype(np.uint8)


def _minmax(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    finite = np.isfinite(a)
    if not finite.any():
        return np.zeros(a.shape, np.uint8)
    lo, hi = float(a[finite].min()), float(a[finite].max())
    out = np.zeros(a.shape, np.float64)
    if hi > lo:
        out = (np.where(finite, a, lo) - lo) * (255.0 / (hi - lo))
    out[~finite] = 0.0
    return np.rint(out).astype(np.uint8)


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """8-bit greyscale from the single-channel high-depth modes ``I;16*``, ``I`` and ``F``."""
    a = np.asarray(img)
    if img.mode.startswith("I;16"):
        out = _scale_16bit(a)
    elif img.mode == "I":
        out = _scale_16bit(a) if a.size and a.min() >= 0 and a.max() <= 65535 else _minmax(a)
    else:  # "F"
        finite = a[np.isfinite(a)]
        if finite.size == a.size and (a.size == 0 or (finite.min() >= 0.0 and finite.max() <= 1.0)):
            out = np.rint(a.astype(np.float64) * 255.0).astype(np.uint8)
        else:
            out = _minmax(a)
    return Image.fromarray(np.ascontiguousarray(out), mode="L")


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert an already-loaded image of any mode to RGB following the module's rules."""
    mode = img.mode
    if mode in ("P", "L", "RGB") and img.info.get("transparency") is not None:
        # A palette entry (P) or a single colour key (L/RGB, PNG tRNS) is transparent.
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_depth_to_l(img).convert("RGB")
    if mode in _ALPHA_MODES:
        # "La" has no direct converter to RGBA in Pillow; go via "LA" which un-premultiplies.
        rgba = img.convert("LA").convert("RGBA") if mode == "La" else img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, tuple(int(c) for c in background))
        canvas.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")


def decode_image(
    data: bytes,
    *,
    path: str = "<bytes>",
    background: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decode encoded image bytes into a fully loaded RGB image.

    ``path`` is only used in error messages. ``max_pixels`` (width * height of the first frame) is checked
    from the header before any pixel is decoded; ``None`` disables our check (Pillow's own hard limit of
    ``2 * PIL.Image.MAX_IMAGE_PIXELS`` still applies, and so does it to a ``max_pixels`` above it: raise
    ``PIL.Image.MAX_IMAGE_PIXELS`` too for larger images). Both guards give the same
    :func:`too_many_pixels` message.
    Raises :class:`ImageLoadError` for empty, truncated, corrupt, oversized or non-image data.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode_image expects bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageLoadError(path, "empty file")
    with warnings.catch_warnings():
        # Our own max_pixels check replaces Pillow's bomb warning (the hard error still surfaces below).
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(bytes(data)))
        except Image.UnidentifiedImageError:
            raise ImageLoadError(path, "not a recognised image format") from None
        except Image.DecompressionBombError as e:
            raise _pillow_bomb(path, e, max_pixels) from None
        except Exception as e:  # corrupt headers make plugins raise all kinds of exceptions
            raise ImageLoadError(path, f"corrupt image header ({type(e).__name__}: {e})") from e
        try:
            w, h = img.size
            if w <= 0 or h <= 0:
                raise ImageLoadError(path, f"invalid image size {w}x{h}")
            if max_pixels is not None and w * h > max_pixels:
                raise too_many_pixels(path, w * h, max_pixels)
            try:
                # Force the full decode so truncated/corrupt pixel data fails here, not later.
                img.load()
            except Image.DecompressionBombError as e:
                raise _pillow_bomb(path, e, max_pixels) from None
            except Exception as e:
                reason = f"corrupt or truncated image data ({type(e).__name__}: {e})"
                raise ImageLoadError(path, reason) from e
            try:
                oriented = ImageOps.exif_transpose(img)
            except Exception:
                # Broken EXIF must not make an otherwise decodable image unusable. Copy because the
                # decoded image is closed (its memory released) below.
                oriented = img.copy()
            try:
                rgb = to_rgb(oriented, background)
            except Exception as e:
                raise ImageLoadError(path, f"cannot convert mode {img.mode!r} to RGB ({e})") from e
        finally:
            img.close()
    return rgb


def load_image(
    path: str | os.PathLike,
    *,
    background: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Read ``path`` and decode it with :func:`decode_image`; every failure is an :class:`ImageLoadError`."""
    p = str(Path(path))
    return decode_image(read_image_bytes(p), path=p, background=background, max_pixels=max_pixels)
