"""What a registered data set or benchmark is, and the registry that holds them.

A :class:`DatasetSpec` says what a data set is, where it comes from, how to get it and how to load
it; a :class:`Benchmark` names a published protocol's ID / near-OOD / far-OOD sets by their registry
names. The catalogue modules of this package register the built-in entries when
:mod:`oodscope.io.registry` is imported.

Where the data live: ``root`` if given, else ``$OODSCOPE_DATA/<entry folder>``, else
``~/.cache/oodscope/data/<entry folder>``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from oodscope.io.sources import DatasetError, ImageSource

__all__ = [
    "BENCHMARKS",
    "DATA_ENV",
    "Benchmark",
    "ChecksumMismatch",
    "DatasetNotAvailable",
    "DatasetSpec",
    "DownloadError",
    "FileChecksum",
    "data_root",
    "get_benchmark",
    "get_dataset",
    "get_spec",
    "known_name",
    "list_benchmarks",
    "list_datasets",
    "register_benchmark",
    "register_dataset",
]

DATA_ENV = "OODSCOPE_DATA"


@dataclass(frozen=True)
class FileChecksum:
    """Expected digest of one file of a data set (``path`` relative to the data set's root).

    ``of="gunzip"`` hashes the decompressed content of a gzip file (so a recompressed copy of the
    same data still matches). ``source`` says where the value comes from.
    """

    path: str
    algorithm: str  # "sha256" or "md5"
    digest: str
    source: str = ""
    of: str = "file"  # "file" | "gunzip"
    required: bool = True  # False: checked only when the file is present (e.g. a kept archive)


@dataclass(frozen=True)
class DatasetSpec:
    """Everything known about one evaluation data set.

    ``expected_files``: number of images once loaded (``None`` when no documented count exists;
    for image-list data the list itself then defines the count). ``urls``: relative file path ->
    URL, for data that can be fetched over plain HTTP(S); ``extract``: those files are archives to
    unpack into the root. ``loader(root)`` returns the :class:`ImageSource` (``root`` is ``None``
    for ``offline`` entries that load from installed packages).
    """

    name: str
    description: str
    source: str
    licence: str
    loader: Callable[[Path | None], ImageSource]
    expected_files: int | None = None
    count_source: str = ""
    checksums: tuple[FileChecksum, ...] = ()
    checksum_source: str = "unverified"
    urls: dict[str, str] = field(default_factory=dict)
    extract: bool = False
    how_to_place: str = ""
    folder: str = ""  # sub-folder of the data root
    offline: bool = False
    tags: tuple[str, ...] = ()

    def root(self, root: str | os.PathLike | None = None) -> Path | None:
        if root is not None:
            return Path(root).expanduser()
        if self.offline:
            return None
        return data_root() / self.folder

    def info(self) -> dict:
        """JSON-able summary (everything but the loader)."""
        return {
            "name": self.name, "description": self.description, "source": self.source, "licence": self.licence,
            "expected_files": self.expected_files, "count_source": self.count_source,
            "checksums": [c.__dict__ for c in self.checksums], "checksum_source": self.checksum_source,
            "urls": dict(self.urls), "how_to_place": self.how_to_place, "folder": self.folder,
            "offline": self.offline, "tags": list(self.tags),
        }


@dataclass(frozen=True)
class Benchmark:
    """A published protocol: ID test set, optional ID fit set, near- and far-OOD sets (registry names)."""

    name: str
    description: str
    id: str
    near: dict[str, str]
    far: dict[str, str]
    id_fit: str | None = None
    classes: Callable[[], list[str]] | None = None  # ID class names (zero-shot protocols)
    source: str = ""


class DatasetNotAvailable(FileNotFoundError):
    """The data set is not on this machine; the message says how to get it."""


class DownloadError(RuntimeError):
    pass


class ChecksumMismatch(DownloadError):
    pass


_REGISTRY: dict[str, DatasetSpec] = {}
BENCHMARKS: dict[str, Benchmark] = {}


def register_dataset(spec: DatasetSpec, *, replace: bool = False) -> DatasetSpec:
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"data set {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def register_benchmark(bench: Benchmark, *, replace: bool = False) -> Benchmark:
    if bench.name in BENCHMARKS and not replace:
        raise ValueError(f"benchmark {bench.name!r} is already registered")
    BENCHMARKS[bench.name] = bench
    return bench


def list_datasets(tag: str | None = None) -> list[DatasetSpec]:
    """Registered data sets (sorted by name), optionally only those with ``tag``."""
    return [s for _, s in sorted(_REGISTRY.items()) if tag is None or tag in s.tags]


def known_name(name: str) -> bool:
    """Whether ``name`` is a registered data set."""
    return name in _REGISTRY


def get_spec(name: str) -> DatasetSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = [n for n in _REGISTRY if name.split("/")[0] in n][:8]
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise KeyError(f"unknown data set {name!r}{hint} (`oodscope datasets` or list_datasets() shows all)") from None


def data_root() -> Path:
    """Base folder of hand-placed and downloaded data: $OODSCOPE_DATA, else ~/.cache/oodscope/data."""
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "oodscope" / "data"


def get_dataset(name: str, root: str | os.PathLike | None = None) -> ImageSource:
    """The data set ``name`` as an ImageSource; raises :class:`DatasetNotAvailable` with instructions."""
    spec = get_spec(name)
    where = spec.root(root)
    if where is not None and not where.exists():
        raise DatasetNotAvailable(not_available(spec, where))
    try:
        return spec.loader(where)
    except (FileNotFoundError, DatasetError) as err:
        if isinstance(err, DatasetNotAvailable):
            raise
        raise DatasetNotAvailable(f"{not_available(spec, where)}\n(loader said: {err})") from err


def not_available(spec: DatasetSpec, where: Path | None) -> str:
    """The message of a :class:`DatasetNotAvailable`: where the data were looked for and how to get them."""
    lines = [f"data set {spec.name!r} is not available at {where}."]
    if spec.urls:
        lines.append(f"Download it with oodscope.io.registry.download_dataset({spec.name!r}), or by hand:")
    if spec.how_to_place:
        lines.append(spec.how_to_place)
    lines.append(f"Pass root=..., or set ${DATA_ENV} (this entry then lives in $OODSCOPE_DATA/{spec.folder}).")
    return "\n".join(lines)


def get_benchmark(name: str) -> Benchmark:
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}") from None


def list_benchmarks() -> list[Benchmark]:
    return [b for _, b in sorted(BENCHMARKS.items())]
