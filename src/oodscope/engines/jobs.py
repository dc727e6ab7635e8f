"""What a distributed job leaves on disk, and how a re-run finds it: no Ray needed here.

A job cuts its input (an :class:`~oodscope.io.ImageSource` in data-resolver order) into
**partitions**: fixed ranges of ``partition_size`` consecutive images, numbered from 0. Each partition
is written as one file, to a temporary name renamed into place (:func:`atomic_write_bytes`): a file
that is there is complete, whatever was killed when. A re-run of the same job (same inputs, same
model or backbone, same partition size: the *job key*) skips the partitions whose file is there; a
worker retried by Ray writes the same partition under the same name, so every image is in the output
exactly once.

* ``score``: ``DIR/part-000000.parquet`` ... with exactly the columns of ``oodscope score --format csv``
  (:data:`SCORE_COLUMNS`, typed: floats, booleans, the prediction set a list of class names) and
  ``DIR/_job.json`` (the job key);
* ``extract``: the features go into the feature store of local extraction (chunks named by partition
  and content, :func:`chunk_name`), and one record per partition, ``STORE/ray-jobs/<key>/part-*.json``
  (dataset index and content hash of each image that loaded, the failures with their reasons).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oodscope.features.store import atomic_write_bytes

DEFAULT_PARTITION_SIZE = 256
SCORE_FORMAT = "oodscope-score-partitions"
FORMAT_VERSION = 1
JOB_FILE = "_job.json"
RECORDS_DIR = "ray-jobs"
#: The columns of ``oodscope score --format csv`` (without --fdr), in its order.
SCORE_COLUMNS = ("item", "score", "p_value", "ood", "predicted_class", "class_probability", "prediction_set",
                 "error")


def partition_bounds(n: int, size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of the partitions of ``n`` images, ``size`` each (the last may be shorter)."""
    if size < 1:
        raise ValueError(f"partition size must be >= 1, got {size}")
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def part_name(number: int, suffix: str) -> str:
    return f"part-{number:06d}{suffix}"


def inputs_key(item_ids: Iterable[str], partition_size: int) -> str:
    """The images of a job, by their ids in order (paths; ``name:index`` for arrays), and how they are cut."""
    digest = hashlib.sha256(f"partition_size={partition_size}\n".encode())
    count = 0
    for item in item_ids:
        digest.update(item.encode("utf-8", "surrogateescape") + b"\n")
        count += 1
    digest.update(f"n={count}".encode())
    return digest.hexdigest()[:20]


def directory_files(directory: str | os.PathLike, runtime: str = "torch") -> dict[str, bytes]:
    """Every file of a saved model directory (relative path -> bytes): its exported networks
    (``export/``) only for ``runtime``'s own export (``export/<runtime>/``)."""
    root = Path(directory)
    files = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or (rel.parts[0] == "export" and (len(rel.parts) < 3 or rel.parts[1] != runtime)):
            continue
        files[rel.as_posix()] = path.read_bytes()
    return files


def files_key(files: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for name, data in sorted(files.items()):
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return digest.hexdigest()[:20]


def unpack_files(files: dict[str, bytes], directory: str | os.PathLike) -> Path:
    root = Path(directory)
    for name, data in files.items():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return root


def done_partitions(directory: Path, suffix: str, count: int) -> set[int]:
    """Numbers of the partitions of a job whose file is already in ``directory``."""
    if not directory.is_dir():
        return set()
    names = {p.name for p in directory.iterdir()}
    return {k for k in range(count) if part_name(k, suffix) in names}


# ------------------------------------------------------------------------------------------ score
@dataclass(frozen=True)
class ScoreJob:
    """The key of a score job: what ``_job.json`` holds and a re-run must match to resume."""

    model: str
    inputs: str
    images: int
    partition_size: int

    @property
    def partitions(self) -> int:
        return -(-self.images // self.partition_size)

    def to_dict(self) -> dict[str, Any]:
        return {"format": SCORE_FORMAT, "format_version": FORMAT_VERSION, "model": self.model,
                "inputs": self.inputs, "images": self.images, "partition_size": self.partition_size,
                "partitions": self.partitions, "columns": list(SCORE_COLUMNS)}


def check_score_directory(out: Path, job: ScoreJob, overwrite: bool) -> None:
    """Refuse an output directory that holds another job's partitions (unless ``overwrite``: they are
    removed), or files that are no score job's; raises ValueError before anything is written."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; the Ray engine writes Parquet partitions into a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    marker = out / JOB_FILE
    if overwrite:
        for path in out.iterdir():
            if path.name == JOB_FILE or (path.name.startswith(("part-", ".part-")) and path.is_file()):
                path.unlink()
        return
    if not marker.is_file():
        raise ValueError(f"{out} is not empty and holds no score job ({JOB_FILE}); choose a new directory, or "
                         "overwrite")
    try:
        stored = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{marker}: not readable ({err}); choose a new directory, or overwrite") from None
    different = [what for what, key in (("the model", "model"), ("the images", "inputs"),
                                        ("the partition size", "partition_size"))
                 if stored.get(key) != job.to_dict()[key]]
    if stored.get("format") != SCORE_FORMAT:
        different.insert(0, "the format")
    if different:
        raise ValueError(f"{out} holds the partitions of another score job ({' and '.join(different)} differ); "
                         "choose a new directory, or overwrite to replace them")


def write_job(out: Path, job: ScoreJob) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / JOB_FILE, json.dumps(job.to_dict(), indent=2).encode())


def score_schema():
    import pyarrow as pa

    return pa.schema([
        ("item", pa.string()), ("score", pa.float64()), ("p_value", pa.float64()), ("ood", pa.bool_()),
        ("predicted_class", pa.string()), ("class_probability", pa.float64()),
        ("prediction_set", pa.list_(pa.string())), ("error", pa.string()),
    ])


def write_score_partition(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rows of :meth:`Predictions.to_dicts` as one Parquet file, written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{c: row.get(c) for c in SCORE_COLUMNS} for row in rows], schema=score_schema())
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def read_partitions(paths: list[Path], columns: list[str] | None = None):
    """The partitions as one pyarrow Table, in partition order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(p, columns=columns) for p in paths]
    if not tables:
        schema = score_schema()
        return schema.empty_table() if columns is None else pa.schema([schema.field(c) for c in columns]).empty_table()
    return pa.concat_tables(tables)


# ------------------------------------------------------------------------------------------ extract
def records_dir(store_root: Path, key: str) -> Path:
    return Path(store_root) / RECORDS_DIR / key


def chunk_name(number: int, hashes: list[bytes]) -> str:
    """A feature-store chunk of one partition, named by its content: a retried partition rewrites the same
    file, a partition with other content never replaces it. Matches the store's ``chunk-*.safetensors``."""
    digest = hashlib.blake2b(b"".join(hashes), digest_size=8).hexdigest()
    return f"chunk-ray-{number:06d}-{digest}.safetensors"


def write_record(path: Path, record: dict[str, Any]) -> None:
    atomic_write_bytes(path, json.dumps(record, separators=(",", ":")).encode())


def read_record(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def remove_tree(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------ score jobs
@dataclass
class ScorePlan:
    """A score job checked before anything runs: the model's files, the images, the output directory."""

    model_dir: Path
    files: dict[str, bytes]
    source: Any
    item_ids: list[str]
    job: ScoreJob
    out: Path
    config: dict[str, Any] = field(default_factory=dict)
    runtime: str = "torch"

    @property
    def calibrated(self) -> bool:
        return bool(self.config.get("threshold")) and bool(self.config.get("calibration"))


@dataclass
class ScoreRun:
    """What a score job wrote: ``partitions`` (Parquet files in input order) and its totals."""

    output: Path
    partitions: list[Path]
    images: int
    written: int  # partitions this run computed
    skipped: int  # partitions an earlier run had written
    scored: int
    n_ood: int
    failures: list[tuple[str, str]]
    calibrated: bool
    alpha: float
    seconds: float

    def table(self, columns: list[str] | None = None):
        """Every row, in input order, as a pyarrow Table."""
        return read_partitions(self.partitions, columns)


def plan_score(model_dir: str | os.PathLike, images: Any, out_dir: str | os.PathLike, *,
               partition_size: int = DEFAULT_PARTITION_SIZE, overwrite: bool = False,
               runtime: str = "torch") -> ScorePlan:
    """Check a score job without running anything (ValueError: not a model, no such images, an output
    directory holding another job unless ``overwrite``). ``runtime``: the network runs on torch or on the
    model's ``export/<runtime>`` (as :meth:`OODModel.load`); its files are part of the job's model key."""
    from oodscope.io import resolve_images
    from oodscope.pipeline.persistence import read_config

    model_dir = Path(model_dir)
    config = read_config(model_dir)
    files = directory_files(model_dir, runtime)
    source = resolve_images(images, missing_ok=True)  # a missing file in a list is a failed row, as locally
    ids = [source.item_id(i) for i in range(len(source))]
    job = ScoreJob(files_key({**files, "runtime": runtime.encode()}), inputs_key(ids, partition_size), len(source),
                   partition_size)
    out = Path(out_dir)
    check_score_directory(out, job, overwrite)
    return ScorePlan(model_dir, files, source, ids, job, out, config, runtime)


def finish_score(plan: ScorePlan, model: Any, *, written: int, skipped: int, started: float) -> ScoreRun:
    """The totals of a score job, read back from its partitions (every one must be there)."""
    paths = [plan.out / part_name(k, ".parquet") for k in range(plan.job.partitions)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise RuntimeError(f"the job ended without writing {len(missing)} partition(s): {', '.join(missing[:5])}")
    totals = read_partitions(paths, ["item", "ood", "error"]).to_pydict()
    failures = [(item, error) for item, error in zip(totals["item"], totals["error"], strict=True) if error is not None]
    return ScoreRun(output=plan.out, partitions=paths, images=plan.job.images, written=written, skipped=skipped,
                    scored=plan.job.images - len(failures), n_ood=sum(1 for v in totals["ood"] if v),
                    failures=failures, calibrated=model.is_calibrated, alpha=model.alpha,
                    seconds=time.perf_counter() - started)
