"""Registry of evaluation data sets: what each is, where it comes from, how to get it, how to check it.

Every entry is a :class:`DatasetSpec`. ``get_dataset(name, root)`` returns an
:class:`~oodscope.io.ImageSource`; ``check_dataset(name, root)`` verifies a copy placed by hand
(file counts, listed files present, checksums); ``download_dataset(name, root)`` fetches the
entries that have a plain HTTP(S) URL (resumable with HTTP ``Range``, checksum-verified).

Entries:

* offline sets that load from installed packages (Fashion-MNIST from Debian's
  ``dataset-fashion-mnist``, scikit-learn digits, conformal-clip-data textiles) and the project's
  Fashion-MNIST-OOD split;
* OpenOOD v1.5 (Zhang et al., 2023) benchmark splits for CIFAR-10, CIFAR-100, ImageNet-200 and
  ImageNet-1K, read from OpenOOD's own data folder (``benchmark_imglist/`` + ``images_classic/`` +
  ``images_largescale/``), which OpenOOD distributes through Google Drive (placed by hand);
* the zero-shot CLIP protocol of MCM (ImageNet-1K val vs the iNaturalist / SUN / Places subsets of
  MOS and Textures);
* MVTec AD and VisA for anomaly detection.

Checksums are recorded only where a source documents them (named in ``checksum_source``); where
none could be verified the entry says ``"unverified"`` and downloads are accepted with a warning.
Where the data live: ``root`` if given, else ``$OODSCOPE_DATA/<entry folder>``, else
``~/.cache/oodscope/data/<entry folder>``.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import http.client
import os
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from oodscope.io import (
    Concat,
    DatasetError,
    FileList,
    FlatFolder,
    ImageFolder,
    ImageSource,
    Relabel,
    digits,
    fashion_mnist,
    fashion_mnist_ood,
    textiles,
)

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "ChecksumMismatch",
    "CheckReport",
    "DatasetNotAvailable",
    "DatasetSpec",
    "DownloadError",
    "FileChecksum",
    "check_dataset",
    "data_root",
    "download_dataset",
    "download_file",
    "get_benchmark",
    "get_dataset",
    "get_spec",
    "list_benchmarks",
    "list_datasets",
    "register_dataset",
]

DATA_ENV = "OODSCOPE_DATA"


# ============================================================================ specs
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


def list_datasets(tag: str | None = None) -> list[DatasetSpec]:
    """Registered data sets (sorted by name), optionally only those with ``tag``."""
    return [s for _, s in sorted(_REGISTRY.items()) if tag is None or tag in s.tags]


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
        raise DatasetNotAvailable(_not_available(spec, where))
    try:
        return spec.loader(where)
    except (FileNotFoundError, DatasetError) as err:
        if isinstance(err, DatasetNotAvailable):
            raise
        raise DatasetNotAvailable(f"{_not_available(spec, where)}\n(loader said: {err})") from err


def _not_available(spec: DatasetSpec, where: Path | None) -> str:
    lines = [f"data set {spec.name!r} is not available at {where}."]
    if spec.urls:
        lines.append(f"Download it with oodscope.evaluation.datasets.download_dataset({spec.name!r}), or by hand:")
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


# ============================================================================ checking
@dataclass
class CheckReport:
    name: str
    root: str | None
    ok: bool
    n_found: int | None
    n_expected: int | None
    checksums: list[dict]  # path, algorithm, expected, actual, ok / "missing" / "skipped"
    problems: list[str]

    def __str__(self) -> str:
        found = "no images found" if self.n_found is None else f"{self.n_found} images"
        head = f"{self.name}: {'OK' if self.ok else 'PROBLEMS'} ({found}"
        head += f", expected {self.n_expected})" if self.n_expected is not None else ", count not documented)"
        return "\n".join([head, *(f"  - {p}" for p in self.problems)])


def file_digest(path: str | os.PathLike, algorithm: str = "sha256", of: str = "file") -> str:
    h = hashlib.new(algorithm)
    opener = gzip.open if of == "gunzip" else open
    with opener(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_dataset(name: str, root: str | os.PathLike | None = None, *, verify_checksums: bool = True) -> CheckReport:
    """Verify a placed copy: required files and checksums, every listed image present, image count."""
    spec = get_spec(name)
    where = spec.root(root)
    problems: list[str] = []
    sums: list[dict] = []
    if where is not None and not where.exists():
        return CheckReport(name, str(where), False, None, spec.expected_files, [],
                           [f"root {where} does not exist", _not_available(spec, where)])
    for c in spec.checksums:
        path = _checksum_path(spec, c, where)
        row = {"path": c.path, "algorithm": c.algorithm, "expected": c.digest, "actual": None, "status": "missing"}
        if path is None or not path.is_file():
            if c.required:
                problems.append(f"missing file {c.path}")
            else:
                row["status"] = "skipped (file not kept)"
        elif not verify_checksums:
            row["status"] = "skipped"
        else:
            row["actual"] = file_digest(path, c.algorithm, c.of)
            row["status"] = "ok" if row["actual"] == c.digest.lower() else "mismatch"
            if row["status"] == "mismatch":
                problems.append(f"{c.path}: {c.algorithm} {row['actual']} != expected {c.digest}")
        sums.append(row)
    n_found = None
    try:
        source = spec.loader(where)
        n_found = len(source)
        missing = _missing_files(source)
        if missing:
            problems.append(f"{len(missing)} listed image file(s) are missing, e.g. {', '.join(missing[:3])}")
    except (FileNotFoundError, DatasetError, ImportError) as err:
        problems.append(f"cannot load: {err}")
    if n_found is not None and spec.expected_files is not None and n_found != spec.expected_files:
        problems.append(f"found {n_found} images, expected {spec.expected_files} ({spec.count_source})")
    return CheckReport(name, None if where is None else str(where), not problems, n_found, spec.expected_files,
                       sums, problems)


def _checksum_path(spec: DatasetSpec, c: FileChecksum, where: Path | None) -> Path | None:
    if where is not None:
        return where / c.path
    locate = getattr(spec.loader, "locate", None)  # offline entries know where their files are
    return locate(c.path) if locate else None


def _missing_files(source: ImageSource) -> list[str]:
    paths = getattr(source, "paths", None)
    if paths is None and hasattr(source, "sources"):
        return [m for s in source.sources for m in _missing_files(s)]
    if paths is None and hasattr(source, "source"):
        return _missing_files(source.source)
    return [str(p) for p in (paths or []) if not os.path.isfile(p)]


# ============================================================================ downloading
def download_file(
    url: str,
    dest: str | os.PathLike,
    *,
    checksum: FileChecksum | None = None,
    timeout: float = 30.0,
    progress: bool = True,
    chunk_size: int = 1 << 20,
) -> Path:
    """Fetch ``url`` to ``dest``, resuming a previous partial download (``dest.part``) with HTTP Range.

    The file appears at ``dest`` only complete and (when ``checksum`` is given) verified. A digest
    mismatch keeps the bad bytes at ``dest.corrupt`` and raises :class:`ChecksumMismatch`. Network
    failures raise :class:`DownloadError` saying how to place the file by hand; the partial file is
    kept so the next call resumes.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file() and (checksum is None or _matches(dest, checksum)):
        return dest
    part = dest.with_name(dest.name + ".part")
    for _attempt in range(2):  # a second attempt only after a 416 on a stale partial file
        offset = part.stat().st_size if part.is_file() else 0
        request = urllib.request.Request(url, headers={"User-Agent": "oodscope-downloader"})
        if offset:
            request.add_header("Range", f"bytes={offset}-")
        try:
            response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - URLs come from the registry
        except urllib.error.HTTPError as err:
            if err.code == 416 and offset:
                # The server has nothing after our offset: the partial file is complete (or longer
                # than the file, i.e. stale). Verify it; if it is bad, start over once.
                if checksum is None or _matches(part, checksum):
                    os.replace(part, dest)
                    return dest
                part.unlink()
                continue
            raise DownloadError(f"{url}: HTTP {err.code} {err.reason}. {_by_hand(url, dest)}") from err
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise DownloadError(
                f"cannot reach {urllib.parse.urlsplit(url).netloc} ({reason}); this machine looks offline or "
                f"the server is down. {_by_hand(url, dest)}"
            ) from err
        with response:
            status = getattr(response, "status", 200)
            if status == 206:
                start = _content_range_start(response.headers.get("Content-Range"))
                if start != offset:
                    raise DownloadError(f"{url}: server resumed at byte {start}, asked for {offset}")
                mode = "ab"
            else:  # 200: the server ignored Range -> the body is the whole file
                offset, mode = 0, "wb"
            total = response.headers.get("Content-Length")
            total = offset + int(total) if total is not None else None
            done = offset
            last_print = 0.0
            try:
                with open(part, mode) as fh:
                    while block := response.read(chunk_size):
                        fh.write(block)
                        done += len(block)
                        if progress and time.monotonic() - last_print > 1.0:
                            last_print = time.monotonic()
                            pct = f" ({100 * done / total:.0f}%)" if total else ""
                            print(f"\r{dest.name}: {done / 1e6:.1f} MB{pct}", end="", file=sys.stderr, flush=True)
            except (OSError, http.client.HTTPException) as err:
                raise DownloadError(
                    f"download of {url} interrupted after {done} bytes ({err}); run again to resume from {part}"
                ) from err
            if progress:
                print(f"\r{dest.name}: {done / 1e6:.1f} MB done", file=sys.stderr, flush=True)
            if total is not None and done != total:
                raise DownloadError(f"{url}: got {done} of {total} bytes; run again to resume from {part}")
        break
    if checksum is not None:
        actual = file_digest(part, checksum.algorithm, checksum.of)
        if actual != checksum.digest.lower():
            bad = dest.with_name(dest.name + ".corrupt")
            os.replace(part, bad)
            raise ChecksumMismatch(
                f"{dest.name}: {checksum.algorithm} is {actual}, expected {checksum.digest} "
                f"({checksum.source or 'registry'}). The bytes were kept at {bad}; the download was not used."
            )
    else:
        warnings.warn(f"{dest.name}: no documented checksum; the download is unverified "
                      f"(sha256 {file_digest(part)})", stacklevel=2)
    os.replace(part, dest)
    return dest


def _matches(path: Path, checksum: FileChecksum) -> bool:
    return file_digest(path, checksum.algorithm, checksum.of) == checksum.digest.lower()


def _content_range_start(value: str | None) -> int:
    # "bytes 100-199/200"
    try:
        return int(value.split()[1].split("-")[0])
    except (AttributeError, IndexError, ValueError):
        return -1


def _by_hand(url: str, dest: Path) -> str:
    return (f"To install it by hand, download {url} on a machine with network access and copy it to {dest} "
            f"(a partial {dest.name}.part is resumed on the next call).")


def download_dataset(name: str, root: str | os.PathLike | None = None, *, progress: bool = True,
                     timeout: float = 30.0) -> CheckReport:
    """Download (and unpack) an entry that has URLs, then :func:`check_dataset` it."""
    spec = get_spec(name)
    if not spec.urls:
        raise DownloadError(f"{name} has no plain-HTTP download. {spec.how_to_place}")
    where = spec.root(root)
    assert where is not None
    sums = {c.path: c for c in spec.checksums}
    for rel, url in spec.urls.items():
        target = where / rel
        marker = where / f".{Path(rel).name}.extracted"
        if spec.extract and marker.is_file():
            continue
        download_file(url, target, checksum=sums.get(rel), timeout=timeout, progress=progress)
        if spec.extract:
            extract_archive(target, where)
            marker.write_text(url + "\n")
    return check_dataset(name, where, verify_checksums=False)


def extract_archive(archive: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Unpack a .tar(.gz/.xz) or .zip into ``dest``, refusing members that would land outside it."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    base = os.path.realpath(dest)

    def safe(name: str) -> bool:
        target = os.path.realpath(os.path.join(base, name))
        return os.path.commonpath([base, target]) == base

    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            bad = [n for n in zf.namelist() if not safe(n)]
            if bad:
                raise DownloadError(f"{archive}: refusing members outside the target folder: {bad[:3]}")
            zf.extractall(dest)
        return
    with tarfile.open(archive) as tf:
        members = tf.getmembers()
        bad = [m.name for m in members if not safe(m.name) or m.issym() or m.islnk() or m.isdev()]
        if bad:
            raise DownloadError(f"{archive}: refusing unsafe members (outside the folder, links or devices): {bad[:3]}")
        if sys.version_info >= (3, 12) or hasattr(tarfile, "data_filter"):
            tf.extractall(dest, filter="data")
        else:  # pragma: no cover - Python < 3.11.4: members were checked above
            tf.extractall(dest)  # noqa: S202


# ============================================================================ loaders
def _offline(fn: Callable[[], ImageSource], locate: Callable[[str], Path | None] | None = None):
    def load(root: Path | None) -> ImageSource:
        return fn()

    load.locate = locate  # type: ignore[attr-defined]
    return load


def _fashion_file(rel: str) -> Path | None:
    from oodscope.io.realdata import FASHION_MNIST_DEBIAN_DIR, FASHION_MNIST_ENV

    folder = Path(os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DEBIAN_DIR)
    for candidate in (folder / rel, folder / rel.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def _fashion_loader(fn: Callable[[Path | None], ImageSource]):
    def load(root: Path | None) -> ImageSource:
        return fn(root)

    load.locate = _fashion_file  # type: ignore[attr-defined]
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
    def load(root: Path | None) -> ImageSource:
        assert root is not None
        path = root / rel
        if not path.is_dir():
            raise FileNotFoundError(f"folder {path} not found")
        if labeled:
            return ImageFolder(path, class_names=class_names)
        return FlatFolder(path)

    return load


def _imagenet_val(root: Path | None) -> ImageSource:
    from oodscope.backbones.imagenet import imagenet_class_names, imagenet_wnids

    assert root is not None
    folder = root / "val"
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {folder} not found")
    source = ImageFolder(folder, class_names=imagenet_wnids())
    return Relabel(source, source.labels, imagenet_class_names())


# ---------------------------------------------------------------- anomaly data sets
MVTEC_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
                    "screw", "tile", "toothbrush", "transistor", "wood", "zipper")
VISA_CATEGORIES = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2",
                   "pcb3", "pcb4", "pipe_fryum")


def _mvtec_category_dir(root: Path, category: str) -> Path:
    for candidate in (root / category, root / "mvtec_anomaly_detection" / category):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"MVTec AD category folder {category!r} not found under {root}")


def _mvtec(category: str, split: str):
    """train: defect-free images (label 0 'good'); test: 'good' = 0, every defect type = 1 ('defect')."""

    def load(root: Path | None) -> ImageSource:
        assert root is not None
        folder = ImageFolder(_mvtec_category_dir(root, category) / split)
        good = folder.class_names.index("good") if "good" in folder.class_names else -1
        labels = np.where(folder.labels == good, 0, 1)
        return Relabel(folder, labels, ["good", "defect"])

    return load


def _mvtec_all(root: Path | None) -> ImageSource:
    return Concat([_mvtec(c, s)(root) for c in MVTEC_CATEGORIES for s in ("train", "test")])


def _visa(category: str | None, split: str | None):
    """VisA's 1-class split (``split_csv/1cls.csv``: object, split, label, image, mask); 0 normal, 1 anomaly."""

    def load(root: Path | None) -> ImageSource:
        assert root is not None
        base = root / "VisA_20220922" if (root / "VisA_20220922").is_dir() else root
        table = base / "split_csv" / "1cls.csv"
        if not table.is_file():
            raise FileNotFoundError(f"{table} not found")
        paths, labels = [], []
        with open(table, newline="") as fh:
            for row in csv.DictReader(fh):
                if (category is None or row["object"] == category) and (split is None or row["split"] == split):
                    paths.append(base / row["image"])
                    labels.append(0 if row["label"].strip().lower() == "normal" else 1)
        if not paths:
            raise DatasetError(f"{table}: no rows for object={category!r}, split={split!r}")
        return Relabel(FileList(paths), labels, ["normal", "anomaly"])

    return load


# ============================================================================ the entries
_FASHION_SRC = ("Xiao, Rasul & Vollgraf, 'Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning "
                "Algorithms', arXiv:1708.07747, 2017; read from Debian's dataset-fashion-mnist package")
_FASHION_HOW = ("apt-get install dataset-fashion-mnist (files in /usr/share/datasets/fashion-mnist), or put the four "
                "*-idx?-ubyte[.gz] files from github.com/zalandoresearch/fashion-mnist in a folder and set "
                "$OODSCOPE_FASHION_MNIST to it.")
# sha256 of the *decompressed* IDX content, computed here from Debian's package (its .gz files are
# recompressed, so upstream's published md5 of the .gz files does not apply to them).
_FASHION_SUMS = {
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
}
_FASHION_SUM_SOURCE = ("computed in this project from the decompressed files of Debian's dataset-fashion-mnist "
                       "(not compared with upstream, which publishes md5 of its own .gz files only)")


def _fashion_checksums(split: str) -> tuple[FileChecksum, ...]:
    prefix = "t10k" if split == "test" else "train"
    return tuple(FileChecksum(rel, "sha256", digest, _FASHION_SUM_SOURCE, of="gunzip")
                 for rel, digest in _FASHION_SUMS.items() if rel.startswith(prefix))


def _register_offline() -> None:
    for split, n in (("test", 10_000), ("train", 60_000)):
        register_dataset(DatasetSpec(
            name=f"fashion-mnist/{split}", description=f"Fashion-MNIST {split} split, 10 classes, 28x28 greyscale",
            source=_FASHION_SRC, licence="MIT", loader=_fashion_loader(lambda r, s=split: fashion_mnist(s)),
            expected_files=n, count_source="Fashion-MNIST paper", checksums=_fashion_checksums(split),
            checksum_source=_FASHION_SUM_SOURCE, how_to_place=_FASHION_HOW, offline=True,
            tags=("offline", "fashion-mnist")))
    split_doc = ("ID = {T-shirt/top, Trouser, Dress, Sandal, Sneaker, Bag} (labels 0..5); "
                 "near-OOD = {Pullover, Coat, Shirt, Ankle boot}")
    register_dataset(DatasetSpec(
        name="fashion-mnist-ood/id", description=f"Fashion-MNIST-OOD ID test set (test split). {split_doc}",
        source=_FASHION_SRC, licence="MIT", loader=_fashion_loader(lambda r: fashion_mnist_ood("test").id),
        expected_files=6_000, count_source="6 classes x 1,000 test images", checksums=_fashion_checksums("test"),
        checksum_source=_FASHION_SUM_SOURCE, how_to_place=_FASHION_HOW, offline=True,
        tags=("offline", "fashion-mnist-ood", "id")))
    register_dataset(DatasetSpec(
        name="fashion-mnist-ood/id-fit",
        description=f"Fashion-MNIST-OOD ID fit set: first 1,000 training images of each ID class. {split_doc}",
        source=_FASHION_SRC, licence="MIT",
        loader=_fashion_loader(lambda r: fashion_mnist_ood("train", per_class=1000).id),
        expected_files=6_000, count_source="6 classes x 1,000", checksums=_fashion_checksums("train"),
        checksum_source=_FASHION_SUM_SOURCE, how_to_place=_FASHION_HOW, offline=True,
        tags=("offline", "fashion-mnist-ood", "id-fit")))
    register_dataset(DatasetSpec(
        name="fashion-mnist-ood/near", description=f"Fashion-MNIST-OOD near-OOD test set. {split_doc}",
        source=_FASHION_SRC, licence="MIT", loader=_fashion_loader(lambda r: fashion_mnist_ood("test").near_ood),
        expected_files=4_000, count_source="4 classes x 1,000 test images", checksums=_fashion_checksums("test"),
        checksum_source=_FASHION_SUM_SOURCE, how_to_place=_FASHION_HOW, offline=True,
        tags=("offline", "fashion-mnist-ood", "near")))
    register_dataset(DatasetSpec(
        name="digits", description="scikit-learn's 8x8 handwritten digits (far-OOD for Fashion-MNIST-OOD)",
        source="scikit-learn load_digits (UCI optical recognition of handwritten digits test set)",
        licence="BSD-3-Clause (scikit-learn); data CC BY 4.0 (UCI)", loader=_offline(digits),
        expected_files=1_797, count_source="scikit-learn documentation", checksum_source="not applicable (in package)",
        how_to_place="pip install scikit-learn", offline=True, tags=("offline", "far")))
    register_dataset(DatasetSpec(
        name="textiles", description="Simulated 250x250 textile images: nominal / local defect / global defect "
        "(far-OOD for Fashion-MNIST-OOD)", source="PyPI package conformal-clip-data",
        licence="MIT", loader=_offline(textiles), expected_files=2_000, count_source="1,000 + 500 + 500 (package)",
        checksum_source="not applicable (in package)", how_to_place="pip install conformal-clip-data",
        offline=True, tags=("offline", "far")))


_OPENOOD_SRC = ("Zhang, Yang, Wang, Wang, Lin, Zhang, Sun, Du, Zhou, Zhang, Li, Liu, Chen & Li, 'OpenOOD v1.5: "
                "Enhanced Benchmark for Out-of-Distribution Detection', arXiv:2306.09301 / NeurIPS 2023 workshop "
                "(DistShift); splits as in github.com/Jingkang50/OpenOOD openood/evaluation_api/datasets.py")
_OPENOOD_HOW = ("Get OpenOOD's data folder with its own downloader (github.com/Jingkang50/OpenOOD: "
                "`bash scripts/download/download.sh`, or `python scripts/download/download.py` with gdown; the "
                "archives are on Google Drive, which needs a browser session or gdown) so that it holds "
                "benchmark_imglist/, images_classic/ and images_largescale/. Pass that folder as root, or put it "
                "at $OODSCOPE_DATA/openood. Check it with check_dataset(name).")
# Licences differ per source set; each OOD set keeps the terms of the data set it was sampled from.
_OPENOOD_LICENCE = {
    "cifar10": "CIFAR terms (no explicit licence; cite Krizhevsky 2009)",
    "cifar100": "CIFAR terms (no explicit licence; cite Krizhevsky 2009)",
    "tin": "Tiny ImageNet: ImageNet terms of access (non-commercial research)",
    "mnist": "MNIST: CC BY-SA 3.0 (LeCun, Cortes & Burges)",
    "svhn": "SVHN: non-commercial use only",
    "texture": "DTD: research use (Cimpoi et al. 2014)",
    "textures": "DTD: research use (Cimpoi et al. 2014)",
    "places365": "Places365: non-commercial research and education (MIT CSAIL terms)",
    "imagenet200": "ImageNet terms of access (non-commercial research)",
    "imagenet": "ImageNet terms of access (non-commercial research)",
    "ssb_hard": "ImageNet-21K terms of access (non-commercial research)",
    "ninco": "NINCO: images from several sources, see github.com/j-cb/NINCO",
    "inaturalist": "iNaturalist 2017 terms (non-commercial research)",
    "openimage_o": "Open Images: annotations CC BY 4.0, images CC BY 2.0 (per image)",
}
# Counts with a documented source; the others are defined by OpenOOD's image lists.
_OPENOOD_COUNTS = {
    ("imagenet", "ssb_hard"): (49_000, "pytorch-ood SSBHard docstring (OpenOOD's SSB-hard)"),
    ("imagenet", "ninco"): (5_879, "NINCO README (github.com/j-cb/NINCO)"),
    ("imagenet", "inaturalist"): (10_000, "MOS (Huang & Li, CVPR 2021) README"),
    ("imagenet", "openimage_o"): (15_869, "pytorch-ood OpenImagesO docstring (OpenOOD test list)"),
}
OPENOOD_SPLITS = {
    "cifar10": {"near": ("cifar100", "tin"), "far": ("mnist", "svhn", "texture", "places365")},
    "cifar100": {"near": ("cifar10", "tin"), "far": ("mnist", "svhn", "texture", "places365")},
    "imagenet200": {"near": ("ssb_hard", "ninco"), "far": ("inaturalist", "textures", "openimage_o")},
    "imagenet": {"near": ("ssb_hard", "ninco"), "far": ("inaturalist", "textures", "openimage_o")},
}


def _register_openood() -> None:
    for bench, split in OPENOOD_SPLITS.items():
        classic = bench.startswith("cifar")
        id_dir = "images_classic/" if classic else "images_largescale/"
        pretty = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "imagenet200": "ImageNet-200",
                  "imagenet": "ImageNet-1K"}[bench]
        for part in ("train", "val", "test"):
            register_dataset(DatasetSpec(
                name=f"openood-v1.5/{bench}/{part}",
                description=f"OpenOOD v1.5 {pretty} ID {part} split (benchmark_imglist/{bench}/{part}_{bench}.txt)",
                source=_OPENOOD_SRC, licence=_OPENOOD_LICENCE[bench],
                loader=_imglist(f"benchmark_imglist/{bench}/{part}_{bench}.txt", id_dir),
                count_source="defined by OpenOOD's image list", how_to_place=_OPENOOD_HOW, folder="openood",
                tags=("openood-v1.5", bench, "id")))
        for kind, names in split.items():
            for ood in names:
                # Textures lives in images_classic/ for every benchmark (OpenOOD's DATA_INFO).
                data_dir = "images_classic/" if classic or ood == "textures" else "images_largescale/"
                n, count_src = _OPENOOD_COUNTS.get((bench, ood), (None, "defined by OpenOOD's image list"))
                register_dataset(DatasetSpec(
                    name=f"openood-v1.5/{bench}/{kind}/{ood}",
                    description=f"OpenOOD v1.5 {pretty} {kind}-OOD set {ood} "
                    f"(benchmark_imglist/{bench}/test_{ood}.txt)",
                    source=_OPENOOD_SRC, licence=_OPENOOD_LICENCE[ood],
                    loader=_imglist(f"benchmark_imglist/{bench}/test_{ood}.txt", data_dir),
                    expected_files=n, count_source=count_src, how_to_place=_OPENOOD_HOW, folder="openood",
                    tags=("openood-v1.5", bench, kind)))
        BENCHMARKS[f"openood-v1.5/{bench}"] = Benchmark(
            name=f"openood-v1.5/{bench}", description=f"OpenOOD v1.5 {pretty}: near-OOD {', '.join(split['near'])}; "
            f"far-OOD {', '.join(split['far'])}",
            id=f"openood-v1.5/{bench}/test", id_fit=f"openood-v1.5/{bench}/train",
            near={o: f"openood-v1.5/{bench}/near/{o}" for o in split["near"]},
            far={o: f"openood-v1.5/{bench}/far/{o}" for o in split["far"]}, source=_OPENOOD_SRC)


_MOS_SRC = ("Huang & Li, 'MOS: Towards Scaling Out-of-distribution Detection for Large Semantic Space', CVPR 2021 "
            "(github.com/deeplearning-wisc/large_scale_ood); used for zero-shot CLIP by Ming et al., 'Delving into "
            "Out-of-Distribution Detection with Vision-Language Representations' (MCM), NeurIPS 2022")
_MOS_BASE = "http://pages.cs.wisc.edu/~huangrui/imagenet_ood_dataset/"
_DTD_URL = "https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz"
_DTD_SHA256 = "e42855a52a4950a3b59612834602aa253914755c95b0cff9ead6d07395f8e205"
_ANOMALIB = "documented in anomalib's data modules (github.com/openvinotoolkit/anomalib); not re-verified here"


def _register_zero_shot() -> None:
    register_dataset(DatasetSpec(
        name="imagenet-1k/val", description="ImageNet-1K validation set (50 images x 1,000 classes), the ID set of "
        "the zero-shot CLIP OOD protocol (MCM / NegLabel)",
        source="Russakovsky et al., 'ImageNet Large Scale Visual Recognition Challenge', IJCV 2015",
        licence="ImageNet terms of access (non-commercial research and education)", loader=_imagenet_val,
        expected_files=50_000, count_source="ILSVRC-2012 validation set",
        how_to_place="Download ILSVRC2012_img_val.tar from image-net.org (account needed) and arrange it as "
        "val/<wnid>/<image>.JPEG (one folder per class, e.g. with the valprep.sh script used by most "
        "PyTorch ImageNet examples) under $OODSCOPE_DATA/imagenet-1k or the root you pass.",
        folder="imagenet-1k", tags=("clip-zero-shot", "id")))
    for name, folder in (("inaturalist", "iNaturalist"), ("sun", "SUN"), ("places", "Places")):
        register_dataset(DatasetSpec(
            name=f"mos/{name}", description=f"MOS {folder} OOD subset for ImageNet-1K: 10,000 images of concepts "
            "not in ImageNet-1K", source=_MOS_SRC,
            licence={"inaturalist": "iNaturalist 2017 terms (non-commercial research)",
                     "sun": "SUN database terms (research)",
                     "places": "Places terms (non-commercial research and education)"}[name],
            loader=_folder(folder, labeled=False), expected_files=10_000, count_source="MOS README",
            urls={f"{folder}.tar.gz": f"{_MOS_BASE}{folder}.tar.gz"}, extract=True,
            how_to_place=f"wget {_MOS_BASE}{folder}.tar.gz and unpack it so that {folder}/ (images inside, possibly "
            "in sub-folders) is in the root ($OODSCOPE_DATA/mos by default). No checksum is published: unverified.",
            folder="mos", tags=("clip-zero-shot", "far")))
    register_dataset(DatasetSpec(
        name="dtd", description="Describable Textures Dataset, all 5,640 images (47 classes); the 'Textures' far-OOD "
        "set of the MOS / MCM ImageNet protocol",
        source="Cimpoi, Maji, Kokkinos, Mohamed & Vedaldi, 'Describing Textures in the Wild', CVPR 2014",
        licence="research use (see the DTD page)", loader=_folder("dtd/images"), expected_files=5_640,
        count_source="DTD: 47 classes x 120 images", checksums=(
            FileChecksum("dtd-r1.0.1.tar.gz", "sha256", _DTD_SHA256, _ANOMALIB, required=False),),
        checksum_source=_ANOMALIB, urls={"dtd-r1.0.1.tar.gz": _DTD_URL}, extract=True,
        how_to_place=f"wget {_DTD_URL} and unpack it in the root ($OODSCOPE_DATA/dtd) so that dtd/images/<class>/ "
        "exists.", folder="dtd", tags=("clip-zero-shot", "far")))
    from oodscope.backbones.imagenet import imagenet_class_names

    BENCHMARKS["clip-zero-shot/imagenet-1k"] = Benchmark(
        name="clip-zero-shot/imagenet-1k",
        description="Zero-shot OOD with a vision-language model (MCM protocol): ImageNet-1K val vs the MOS subsets of "
        "iNaturalist, SUN, Places and Textures; ID class names = the 1,000 ImageNet classes",
        id="imagenet-1k/val", near={},
        far={"inaturalist": "mos/inaturalist", "sun": "mos/sun", "places": "mos/places", "textures": "dtd"},
        classes=imagenet_class_names, source=_MOS_SRC)


def _register_anomaly() -> None:
    mvtec_src = ("Bergmann, Fauser, Sattlegger & Steger, 'MVTec AD — A Comprehensive Real-World Dataset for "
                 "Unsupervised Anomaly Detection', CVPR 2019")
    mvtec_how = ("Download mvtec_anomaly_detection.tar.xz from www.mvtec.com/company/research/datasets/mvtec-ad "
                 "(a form must be filled in, so no automatic download) and unpack it in the root "
                 "($OODSCOPE_DATA/mvtec-ad) so that <category>/train/good and <category>/test/<defect> exist; keep "
                 "the archive there to have its checksum verified.")
    mvtec_sum = FileChecksum("mvtec_anomaly_detection.tar.xz", "sha256",
                             "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d", _ANOMALIB,
                             required=False)
    common = {"source": mvtec_src, "licence": "CC BY-NC-SA 4.0", "how_to_place": mvtec_how, "folder": "mvtec-ad",
              "checksums": (mvtec_sum,), "checksum_source": _ANOMALIB}
    register_dataset(DatasetSpec(
        name="mvtec-ad", description="MVTec AD, all 15 categories, train (defect-free) + test images (masks excluded)",
        loader=_mvtec_all, expected_files=5_354, count_source="MVTec AD paper: 3,629 train + 1,725 test",
        tags=("anomaly",), **common))
    for category in MVTEC_CATEGORIES:
        for split in ("train", "test"):
            register_dataset(DatasetSpec(
                name=f"mvtec-ad/{category}/{split}",
                description=f"MVTec AD {category} {split} images (0 = good, 1 = defect)",
                loader=_mvtec(category, split), count_source="not documented per category here",
                tags=("anomaly", "mvtec-ad"), **common))
    visa_url = "https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar"
    visa_common = {
        "source": "Zou, Jeong, Pemula, Zhang & Dabeer, 'SPot-the-Difference Self-Supervised Pre-training for "
        "Anomaly Detection and Segmentation', ECCV 2022 (github.com/amazon-science/spot-diff)",
        "licence": "CC BY 4.0", "folder": "visa",
        "checksums": (FileChecksum("VisA_20220922.tar", "sha256",
                                   "2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362", _ANOMALIB,
                                   required=False),),
        "checksum_source": _ANOMALIB, "urls": {"VisA_20220922.tar": visa_url}, "extract": True,
        "how_to_place": f"wget {visa_url} and unpack it in the root ($OODSCOPE_DATA/visa) so that split_csv/1cls.csv "
        "and <object>/Data/Images/ exist (the archive may be kept next to it for checksum verification).",
    }
    register_dataset(DatasetSpec(
        name="visa", description="VisA, 12 objects, all images of the 1-class split (0 normal, 1 anomaly)",
        loader=_visa(None, None), expected_files=10_821, count_source="VisA paper: 9,621 normal + 1,200 anomalous",
        tags=("anomaly",), **visa_common))
    for category in VISA_CATEGORIES:
        for split in ("train", "test"):
            register_dataset(DatasetSpec(
                name=f"visa/{category}/{split}", description=f"VisA {category} {split} images of the 1-class split",
                loader=_visa(category, split), count_source="defined by split_csv/1cls.csv",
                tags=("anomaly", "visa"), **visa_common))


def _register_fashion_benchmark() -> None:
    from oodscope.io import FASHION_MNIST_ID_CLASSES

    BENCHMARKS["fashion-mnist-ood"] = Benchmark(
        name="fashion-mnist-ood", description="Fashion-MNIST-OOD (offline): ID = 6 Fashion-MNIST classes; near-OOD = "
        "the 4 other classes; far-OOD = scikit-learn digits and simulated textiles",
        id="fashion-mnist-ood/id", id_fit="fashion-mnist-ood/id-fit", near={"fashion_near": "fashion-mnist-ood/near"},
        far={"digits": "digits", "textiles": "textiles"}, classes=lambda: list(FASHION_MNIST_ID_CLASSES),
        source=_FASHION_SRC)


_register_offline()
_register_fashion_benchmark()
_register_openood()
_register_zero_shot()
_register_anomaly()
