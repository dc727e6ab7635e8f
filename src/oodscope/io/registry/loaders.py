"""Loader builders shared by the catalogues: each returns ``loader(root) -> ImageSource`` for a DatasetSpec."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from oodscope.io.files import FileList, FlatFolder, ImageFolder
from oodscope.io.sources import ImageSource


def _offline(fn: Callable[[], ImageSource], locate: Callable[[str], Path | None] | None = None):
    """A loader for data from installed packages (``root`` is ignored); ``locate(rel)`` finds a checksummed file."""

    def load(root: Path | None) -> ImageSource:
        return fn()

    load.locate = locate  # type: ignore[attr-defined]
    return load


def _imglist(list_rel: str, data_rel: str) -> Callable[[Path | None], ImageSource]:
    """OpenOOD's "path label" image lists, paths relative to ``data_rel`` under the OpenOOD data folder."""

    def load(root: Path | None) -> ImageSource:
        assert root is not None
        list_file = root / list_rel
        if not list_file.is_file():
            raise FileNotFoundError(f"image list {list_file} not found")
        return FileList(list_file, root=root / data_rel)

    return load


def _folder(rel: str, labeled: bool = True, class_names: list[str] | None = None):
    """The images under ``root/rel``: one class per sub-folder (``labeled``), else every image below it."""

    def load(root: Path | None) -> ImageSource:
        assert root is not None
        path = root / rel
        if not path.is_dir():
            raise FileNotFoundError(f"folder {path} not found")
        if labeled:
            return ImageFolder(path, class_names=class_names)
        return FlatFolder(path)

    return load
