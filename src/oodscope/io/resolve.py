"""The one resolver from a data spec to an image source.

A *data spec* is any of:

* an :class:`ImageSource` (returned as it is);
* an in-memory uint8 array of images, (N, H, W) or (N, H, W, 3) -> :class:`ArrayDataset`;
* a path: a folder (class sub-folders -> :class:`ImageFolder`, otherwise every image below it),
  a ``.txt`` / ``.csv`` list file, or one image file (:func:`open_dataset`'s rule);
* a registry name, one syntax everywhere: ``fashion-mnist/test``, ``textiles/local``, ``digits``
  (``oodscope datasets list``); a path that exists wins over a name;
* a list of the above (paths, list files, folders): their images in order; labels are dropped
  when the parts are mixed.

With ``missing_ok`` a path in a list that does not exist becomes an item whose reading fails (a
per-image error at scoring time) instead of an exception.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from oodscope.io.files import LIST_EXTENSIONS, FileList
from oodscope.io.files import open_dataset as _open_path
from oodscope.io.sources import ArrayDataset, Concat, DatasetError, ImageSource, Relabel

__all__ = ["describe_source", "resolve_images"]


def resolve_images(spec: Any, *, missing_ok: bool = False) -> ImageSource:
    """An :class:`ImageSource` from a data spec (see the module docstring)."""
    if isinstance(spec, ImageSource):
        return spec
    if isinstance(spec, np.ndarray):
        return ArrayDataset(spec)
    if isinstance(spec, (str, os.PathLike)):
        return _one(os.fspath(spec))
    if isinstance(spec, Sequence):
        items = list(spec)
        if not items:
            raise DatasetError("no images given (an empty list)")
        if len(items) == 1:
            return resolve_images(items[0], missing_ok=missing_ok)
        return _many(items, missing_ok)
    raise DatasetError(
        f"expected a folder, a list file, an image, a registered data set name, an image array or an "
        f"ImageSource, got {type(spec).__name__}"
    )


def _one(text: str) -> ImageSource:
    path = Path(text).expanduser()
    if path.exists():
        return _open_path(path)
    from oodscope.io.registry import get_dataset, known_name

    if known_name(text):
        return get_dataset(text)
    hint = ""
    name, sep, option = text.partition(":")
    if sep and known_name(f"{name}/{option}" if option else name):
        hint = f" (registered data sets are named with '/': {name}/{option})" if option else f" (try {name!r})"
    raise DatasetError(f"{text!r} is neither an existing path nor a registered data set name{hint}; "
                       "`oodscope datasets list` shows the names")


def _many(items: list[Any], missing_ok: bool) -> ImageSource:
    sources: list[ImageSource] = []
    files: list[Path] = []

    def flush() -> None:
        if files:
            sources.append(FileList([p.absolute() for p in files]))
            files.clear()

    for item in items:
        if isinstance(item, ImageSource):
            flush()
            sources.append(Relabel(item, None))
            continue
        path = Path(os.fspath(item)).expanduser()
        if path.is_dir() or (path.is_file() and path.suffix.lower() in LIST_EXTENSIONS):
            flush()
            sources.append(Relabel(_open_path(path), None))  # labels of mixed inputs are not used
        elif path.exists() or missing_ok:
            files.append(path)
        else:
            try:
                named = _one(str(item))
            except DatasetError:
                raise DatasetError(f"{str(path)!r} does not exist") from None
            flush()
            sources.append(Relabel(named, None))
    flush()
    return sources[0] if len(sources) == 1 else Concat(sources)


def describe_source(data: Any) -> str:
    """Where data came from, in words (a path, a list of paths, or the data set a subset selects from)."""
    if isinstance(data, (str, os.PathLike)):
        return str(data)
    if hasattr(data, "embedding") and hasattr(data, "available"):  # precomputed Features
        return "features"
    if isinstance(data, Sequence) and not isinstance(data, str):
        return ", ".join(map(str, data))
    inner = data
    while getattr(inner, "root", None) is None and getattr(inner, "name", None) is None \
            and getattr(inner, "source", None) is not None:
        inner = inner.source  # Subset / Relabel: name the data set they select from
    base = getattr(inner, "root", None) or getattr(inner, "name", None)
    if base is None:
        return f"{len(data)} images" if hasattr(data, "__len__") else type(data).__name__
    return str(base) if inner is data else f"{len(data)} items of {base}"
