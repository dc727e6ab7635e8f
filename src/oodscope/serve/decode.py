"""Request decoding: a scoring request's body -> named uploads -> decoded, resized pixels, or one error each.

Two bodies are accepted (anything else is 415): ``multipart/form-data`` with one or more file parts
(any field name; the file name names the image), and ``application/json``
``{"images": [{"name": "a.png", "data": "<base64>"}, ...]}``. Body-level problems (not JSON, no
images, too many images) are a :class:`RequestError` with an HTTP status; an image that cannot be
used (bad base64, not an image, truncated, too many pixels, an unsupported mode) is a per-image error
and the other images of the request are still scored. Decoding goes through
:func:`oodscope.io.images.decode_image` — the same rules, EXIF handling and pixel limit (the
decompression-bomb guard, checked from the header before any pixel is decoded) as every other
oodscope input — and resizing through the backbone's own :func:`prepare_pixels`, so the service sees
exactly the pixels that ``OODModel.predict`` sees.
"""

from __future__ import annotations

import base64
import binascii
import json
import unicodedata
from dataclasses import dataclass
from typing import Any

import numpy as np

from oodscope.backbones.preprocess import prepare_pixels
from oodscope.features.extract import content_hash
from oodscope.io.images import ImageLoadError, decode_image

MAX_NAME = 256


class RequestError(Exception):
    """The request as a whole cannot be served: ``status`` (4xx), ``code`` and a message for people."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = int(status), code, message


@dataclass
class Upload:
    """One image of a request, as received: its name and bytes (or why the bytes could not be had)."""

    name: str
    data: bytes | None
    error: str | None = None


@dataclass
class Prepared:
    """One image ready for the model: its content hash and resized uint8 pixels, or its error."""

    index: int
    name: str
    digest: bytes | None
    pixels: np.ndarray | None
    error: str | None = None
    raw: bytes | None = None  #: the uploaded bytes (kept only when the store keeps images)

    @property
    def ok(self) -> bool:
        return self.error is None


def clean_name(name: Any, index: int) -> str:
    """A printable name of at most :data:`MAX_NAME` characters (``image-<index>`` when none is given)."""
    if not isinstance(name, str) or not name.strip():
        return f"image-{index}"
    shown = "".join(c if unicodedata.category(c)[0] != "C" else "?" for c in name.strip())
    return shown[:MAX_NAME] or f"image-{index}"


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def parse_json_body(body: bytes, *, max_images: int) -> tuple[list[Upload], dict[str, Any]]:
    """``{"images": [{"name": ..., "data": base64}, ...], "maps": bool}`` -> uploads and options."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise RequestError(400, "invalid_json", f"the body is not valid JSON ({type(err).__name__})") from None
    if not isinstance(doc, dict):
        raise RequestError(422, "invalid_request", 'the body must be a JSON object {"images": [...]}')
    items = doc.get("images")
    if not isinstance(items, list):
        raise RequestError(422, "invalid_request", '"images" must be a list of {"name": ..., "data": base64}')
    check_count(len(items), max_images)
    maps = doc.get("maps", False)
    if not isinstance(maps, bool):
        raise RequestError(422, "invalid_request", '"maps" must be true or false')
    uploads = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            item = {"data": item}
        if not isinstance(item, dict):
            raise RequestError(422, "invalid_request", f"images[{i}] must be an object with a base64 \"data\" field")
        name = clean_name(item.get("name"), i)
        data = item.get("data")
        if not isinstance(data, str):
            uploads.append(Upload(name, None, 'no "data" field with the base64 of the image'))
            continue
        try:
            uploads.append(Upload(name, base64.b64decode(data.encode("ascii"), validate=True)))
        except (binascii.Error, ValueError, UnicodeEncodeError):
            uploads.append(Upload(name, None, "the data is not valid base64"))
    return uploads, {"maps": maps}


def check_count(n: int, max_images: int) -> None:
    if n == 0:
        raise RequestError(422, "no_images", "the request holds no image")
    if n > max_images:
        raise RequestError(413, "too_many_images", f"{n} images in one request, more than the limit of {max_images}")


async def parse_form(form: Any, *, max_images: int) -> tuple[list[Upload], dict[str, Any]]:
    """Uploads from a parsed multipart form: every file part is an image; a ``maps`` field may be sent."""
    uploads: list[Upload] = []
    maps = False
    for key, value in form.multi_items():
        if hasattr(value, "read") and hasattr(value, "filename"):
            uploads.append(Upload(clean_name(value.filename, len(uploads)), await value.read()))
            if len(uploads) > max_images:
                check_count(len(uploads), max_images)
        elif key == "maps":
            maps = str(value).strip().lower() in ("1", "true", "yes", "on")
    check_count(len(uploads), max_images)
    return uploads, {"maps": maps}


def prepare(upload: Upload, index: int, spec: Any, *, max_pixels: int | None, keep_raw: bool = False) -> Prepared:
    """Decode and resize one upload for a backbone with input spec ``spec``; never raises for bad data."""
    if upload.data is None:
        return Prepared(index, upload.name, None, None, upload.error or "no image data")
    digest = content_hash(upload.data)
    raw = upload.data if keep_raw else None
    try:
        image = decode_image(upload.data, path=upload.name, max_pixels=max_pixels)
        pixels = prepare_pixels(image, spec)
    except ImageLoadError as err:
        return Prepared(index, upload.name, digest, None, err.reason, raw)
    except MemoryError:
        return Prepared(index, upload.name, digest, None, "not enough memory to decode this image", raw)
    except Exception as err:  # noqa: BLE001 - a per-image failure is reported, never fatal
        return Prepared(index, upload.name, digest, None, f"cannot decode the image ({type(err).__name__})", raw)
    return Prepared(index, upload.name, digest, np.ascontiguousarray(pixels, dtype=np.uint8), None, raw)


__all__ = ["Prepared", "RequestError", "Upload", "check_count", "clean_name", "content_hash", "media_type",
           "parse_form", "parse_json_body", "prepare"]
