"""Checking a placed copy of a data set, and fetching the entries that have plain HTTP(S) URLs.

``check_dataset(name, root)`` verifies a copy placed by hand (required files and checksums, every
listed image present, image count). ``download_dataset(name, root)`` fetches an entry's files
(resumable with HTTP ``Range``, checksum-verified), unpacks its archives and checks the result.
Checksums are recorded only where a source documents them (the entry's ``checksum_source``); where
none could be verified the entry says ``"unverified"`` and downloads are accepted with a warning.
"""

from __future__ import annotations

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
from dataclasses import dataclass
from pathlib import Path

from oodscope.io.registry.specs import (
    ChecksumMismatch,
    DatasetSpec,
    DownloadError,
    FileChecksum,
    get_spec,
    not_available,
)
from oodscope.io.sources import DatasetError, ImageSource

__all__ = ["CheckReport", "check_dataset", "download_dataset", "download_file", "extract_archive", "file_digest"]


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
                           [f"root {where} does not exist", not_available(spec, where)])
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
