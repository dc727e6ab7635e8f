"""File-based image sources: class folders, flat folders, list files, and ``open_dataset``'s rule.

Folders are walked in sorted order with hidden entries and out-of-root symlinks skipped; list files are
``.csv`` (``path``/``label`` columns) or text (one path per line, optional label). See ``docs/io.md``
for the folder layouts and the ``open_dataset`` heuristic.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .images import IMAGE_EXTENSIONS, is_image_path, read_image_bytes
from .sources import DatasetError, ImageSource, as_labels

__all__ = [
    "LIST_EXTENSIONS",
    "FileList",
    "FlatFolder",
    "ImageFolder",
    "open_dataset",
]

LIST_EXTENSIONS = frozenset({".txt", ".csv"})


# ------------------------------------------------------------------------------------------- folders


def _inside(real: str, boundary: str) -> bool:
    try:
        return os.path.commonpath([real, boundary]) == boundary
    except ValueError:  # different drives on Windows
        return False


def _usable_dir(e: os.DirEntry, boundary: str, follow_symlinks: bool) -> bool:
    """A non-hidden directory entry (following allowed symlinks); symlink loops count as not a dir."""
    if e.name.startswith("."):
        return False
    try:
        if e.is_symlink() and not follow_symlinks and not _inside(os.path.realpath(e.path), boundary):
            return False
        return e.is_dir()
    except OSError:
        return False


def _walk_images(top: Path, boundary: str, follow_symlinks: bool, recursive: bool = True) -> list[Path]:
    """Image files under ``top``: sorted by name at each level (pre-order), hidden entries skipped.

    A symlink is used only if its target lies inside ``boundary`` (the real dataset root) or
    ``follow_symlinks`` is set. Each real directory is expanded at most once, which both terminates symlink
    loops and keeps the walk linear.
    """
    out: list[Path] = []
    visited = {os.path.realpath(top)}

    def walk(d: Path) -> None:
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            return  # unreadable directory: nothing to list (the files would be unreadable anyway)
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                is_link = e.is_symlink()
                real = os.path.realpath(e.path) if is_link else None
                if is_link:
                    if not os.path.exists(real):  # dangling link or link loop
                        continue
                    if not follow_symlinks and not _inside(real, boundary):
                        continue
                is_dir = e.is_dir()
                is_file = not is_dir and e.is_file()
            except OSError:
                continue
            if is_dir:
                if not recursive:
                    continue
                real_dir = real if real is not None else os.path.realpath(e.path)
                if real_dir in visited:
                    continue
                visited.add(real_dir)
                walk(d / e.name)
            elif is_file and is_image_path(e.name):
                out.append(d / e.name)

    walk(top)
    return out


def _check_root(root: str | os.PathLike) -> Path:
    p = Path(root).expanduser().absolute()
    if not p.exists():
        raise DatasetError(f"dataset root {str(p)!r} does not exist")
    if not p.is_dir():
        raise DatasetError(f"dataset root {str(p)!r} is not a directory")
    return p


class _FileSource(ImageSource):
    """Items are files; ``item_id`` is the path and ``read`` returns the file content."""

    paths: list[Path]

    def __len__(self) -> int:
        return len(self.paths)

    def item_id(self, i: int) -> str:
        return str(self.paths[self._index(i)])

    def read(self, i: int) -> bytes:
        return read_image_bytes(self.paths[self._index(i)])


class ImageFolder(_FileSource):
    """``root/<class>/**/<image>``: one sub-folder per class.

    Every non-hidden sub-folder is a class, even an empty one (so indices stay stable). Class indices
    follow the sorted folder names, or the order of ``class_names`` when given (then only those folders
    are used and each must exist). Images directly inside ``root`` are ignored. Items are
    ordered by class, then by the sorted walk inside the class folder.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        follow_symlinks: bool = False,
        class_names: Sequence[str] | None = None,
    ) -> None:
        self.root = _check_root(root)
        self.follow_symlinks = follow_symlinks
        boundary = os.path.realpath(self.root)
        if class_names is None:
            with os.scandir(self.root) as it:
                entries = sorted(it, key=lambda e: e.name)
            names = [e.name for e in entries if _usable_dir(e, boundary, follow_symlinks)]
            if not names:
                raise DatasetError(f"ImageFolder {str(self.root)!r} has no class sub-folders")
        else:
            names = [str(c) for c in class_names]
            if len(set(names)) != len(names):
                raise DatasetError("class_names contains duplicates")
            missing = [c for c in names if not (self.root / c).is_dir()]
            if missing:
                raise DatasetError(f"ImageFolder {str(self.root)!r}: missing class folders {missing}")
            outside = [
                c
                for c in names
                if (self.root / c).is_symlink()
                and not follow_symlinks
                and not _inside(os.path.realpath(self.root / c), boundary)
            ]
            if outside:
                raise DatasetError(
                    f"ImageFolder {str(self.root)!r}: class folders {outside} are symlinks pointing outside "
                    "the root; pass follow_symlinks=True to use them"
                )
        paths: list[Path] = []
        labels: list[int] = []
        for k, name in enumerate(names):
            found = _walk_images(self.root / name, boundary, follow_symlinks)
            paths.extend(found)
            labels.extend([k] * len(found))
        if not paths:
            raise DatasetError(f"ImageFolder {str(self.root)!r} contains no images ({_ext_hint()})")
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = names


class FlatFolder(_FileSource):
    """All images under ``root`` (recursively unless ``recursive=False``), unlabeled."""

    def __init__(
        self, root: str | os.PathLike, *, recursive: bool = True, follow_symlinks: bool = False
    ) -> None:
        self.root = _check_root(root)
        self.follow_symlinks = follow_symlinks
        self.paths = _walk_images(self.root, os.path.realpath(self.root), follow_symlinks, recursive)
        if not self.paths:
            raise DatasetError(f"FlatFolder {str(self.root)!r} contains no images ({_ext_hint()})")
        self.labels = None
        self.class_names = None


def _ext_hint() -> str:
    return "recognised extensions: " + " ".join(sorted(IMAGE_EXTENSIONS))


# ---------------------------------------------------------------------------------------- list files

_INT_RE = re.compile(r"^[+-]?\d+$")
_SPLIT_RE = re.compile(r"^(.*?)[\s,]+([^\s,]+)$")


def _parse_txt_line(line: str) -> tuple[str, str | None]:
    """``path`` or ``path<whitespace|comma>label``.

    A line ending in an image extension is entirely a path (so paths may contain spaces or commas);
    otherwise the last comma/whitespace-separated token is the label.
    """
    if is_image_path(line):
        return line, None
    m = _SPLIT_RE.match(line)
    if m is None or not m.group(1):
        return line, None
    return m.group(1).strip(), m.group(2)


def _resolve_labels(
    raw: list[str | None], class_names: Sequence[str] | None, where: str
) -> tuple[np.ndarray | None, list[str] | None]:
    """Label strings -> (int64 labels, class names). Integers are indices, anything else is a name."""
    given = [s for s in raw if s is not None and s != ""]
    if not given:
        return None, (list(class_names) if class_names is not None else None)
    is_int = [bool(_INT_RE.match(s)) for s in given]
    if class_names is not None:
        names = [str(c) for c in class_names]
        lookup = {c: k for k, c in enumerate(names)}
        out = []
        for s in raw:
            if s is None or s == "":
                out.append(-1)
            elif s in lookup:
                out.append(lookup[s])
            elif _INT_RE.match(s):
                out.append(int(s))
            else:
                raise DatasetError(f"{where}: label {s!r} is not one of class_names")
        return as_labels(out, len(raw), names), names
    if all(is_int):
        return as_labels([-1 if s in (None, "") else int(s) for s in raw], len(raw), None), None
    if any(is_int):
        raise DatasetError(f"{where}: labels mix integers and class names; pass class_names to disambiguate")
    names = sorted(set(given))
    lookup = {c: k for k, c in enumerate(names)}
    return np.asarray([-1 if s in (None, "") else lookup[s] for s in raw], dtype=np.int64), names


class FileList(_FileSource):
    """Images listed explicitly.

    ``list_file_or_paths`` is a ``.csv`` file (header with a ``path`` column and optional ``label``
    column), any other text file (one path per line, optionally followed by a comma or whitespace and a
    label; blank lines and lines starting with ``#`` are skipped), or a Python sequence of paths. Labels
    may be integers (class indices, ``-1`` = unknown) or class names (indexed in sorted order, or by
    ``class_names`` when given). Relative paths are resolved against ``root``, else the list file's
    folder, else the current directory. Files are not opened here: a missing file raises
    :class:`ImageLoadError` on ``read``.
    """

    def __init__(
        self,
        list_file_or_paths: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        root: str | os.PathLike | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        if isinstance(list_file_or_paths, (str, os.PathLike)):
            list_file = Path(list_file_or_paths).expanduser().absolute()
            if not list_file.is_file():
                raise DatasetError(f"list file {str(list_file)!r} does not exist")
            base = Path(root).expanduser().absolute() if root is not None else list_file.parent
            if list_file.suffix.lower() == ".csv":
                entries = self._read_csv(list_file)
            else:
                entries = self._read_txt(list_file)
            where = str(list_file)
        else:
            base = Path(root).expanduser().absolute() if root is not None else Path.cwd()
            entries = [(os.fspath(p), None) for p in list_file_or_paths]
            where = "FileList"
        if not entries:
            raise DatasetError(f"{where}: the list is empty")
        self.paths = [base / Path(p).expanduser() for p, _ in entries]
        self.labels, self.class_names = _resolve_labels([lab for _, lab in entries], class_names, where)

    @staticmethod
    def _read_txt(path: Path) -> list[tuple[str, str | None]]:
        entries = []
        with open(path, encoding="utf-8-sig") as fh:
            for line in fh:
                line = line.strip()
                if line and not line.startswith("#"):
                    entries.append(_parse_txt_line(line))
        return entries

    @staticmethod
    def _read_csv(path: Path) -> list[tuple[str, str | None]]:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            fields = {(f or "").strip().lower(): f for f in (reader.fieldnames or [])}
            if "path" not in fields:
                raise DatasetError(
                    f"{str(path)!r}: CSV header needs a 'path' column, got {reader.fieldnames}"
                )
            pcol, lcol = fields["path"], fields.get("label")
            entries = []
            for row in reader:
                p = (row.get(pcol) or "").strip()
                if not p:
                    continue
                lab = (row.get(lcol) or "").strip() if lcol is not None else None
                entries.append((p, lab or None))
        return entries


# ---------------------------------------------------------------------------------------- open_dataset


def _has_direct_images(root: Path) -> bool:
    def is_image_file(e: os.DirEntry) -> bool:
        try:
            return not e.name.startswith(".") and is_image_path(e.name) and e.is_file()
        except OSError:
            return False

    with os.scandir(root) as it:
        return any(is_image_file(e) for e in it)


def open_dataset(spec: str | os.PathLike | ImageSource) -> ImageSource:
    """Open a dataset from a path, by a fixed rule:

    * a ``.txt`` / ``.csv`` file -> :class:`FileList`;
    * a single image file -> ``FileList([path])``;
    * a directory with no (non-hidden) image files directly inside it but with at least one sub-folder
      -> :class:`ImageFolder` (sub-folders are classes);
    * any other directory -> :class:`FlatFolder` (recursive, unlabeled).

    Both directory cases see the same images when the root holds none directly; only the labels differ.
    An :class:`ImageSource` is returned unchanged.
    """
    if isinstance(spec, ImageSource):
        return spec
    p = Path(spec).expanduser()
    if not p.exists():
        raise DatasetError(f"{str(p)!r} does not exist")
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix in LIST_EXTENSIONS:
            return FileList(p)
        if suffix in IMAGE_EXTENSIONS:
            return FileList([p.absolute()])
        raise DatasetError(
            f"{str(p)!r}: not a list file (.txt/.csv) nor an image file ({_ext_hint()})"
        )
    if p.is_dir():
        if not _has_direct_images(p):
            boundary = os.path.realpath(p)
            with os.scandir(p) as it:
                has_subdir = any(_usable_dir(e, boundary, False) for e in it)
            if has_subdir:
                return ImageFolder(p)
        return FlatFolder(p)
    raise DatasetError(f"{str(p)!r} is neither a file nor a directory")
