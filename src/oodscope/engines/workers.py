"""The two stages a Ray job runs on its workers (module level, so that Ray imports them by name).

* :func:`prepare` — a CPU **task** per partition: read the bytes, content hash, decode, resize — the
  very per-image step of local extraction (``oodscope.features.extract._Prepared``), so failures
  carry the same reasons; images whose hash the feature store already holds are not decoded.
* :class:`Forward` — an **actor** (one backbone per actor; on a GPU when the cluster has GPUs) that
  runs the network on the prepared pixels, then, for ``score``, the fitted detector and the decisions
  of the saved model (:func:`oodscope.pipeline.decisions.predict_chunk`, the function local scoring
  uses), and writes the partition atomically. The fitted state reaches each actor once: the saved
  model directory travels in the object store, is unpacked once per node (:func:`model_folder`) and
  the actor's constructor loads it.

Nothing here imports Ray at module level; the specs arrive as Ray object references and are fetched
once per worker process.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from oodscope.engines.jobs import chunk_name, part_name, unpack_files, write_record, write_score_partition
from oodscope.features.store import FeatureStore

#: Columns of a prepared partition (one row per partition; arrays travel as bytes).
PREPARED = ("part", "start", "n", "item_ids", "ok_pos", "ok_hash", "computed", "pixels", "failures")
#: Columns of the summary each actor returns per partition.
SUMMARY = ("part", "n", "ok", "computed", "cached", "failed", "ood", "failures")
_INTS = {PREPARED: {"part", "start", "n"}, SUMMARY: {"part", "n", "ok", "computed", "cached", "failed", "ood"}}


@dataclass(frozen=True)
class PrepareSpec:
    source: Any
    input_spec: Any
    n: int
    partition_size: int
    known: np.ndarray | None  # sorted 'S16' content hashes already in the feature store (extract)
    max_pixels: int | None
    pil_max_pixels: int | None


@dataclass(frozen=True)
class ForwardSpec:
    kind: str  # "extract" | "score"
    batch_size: int
    device: str | None
    backbone: Any = None  # a spec string (created on the worker), a backbone object, or None (the model's)
    backbone_options: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None  # extract: the backbone configuration the store was made for
    store_root: str | None = None
    records: str | None = None
    model_files: dict[str, bytes] | None = None  # score: the saved OODModel directory
    out_dir: str | None = None
    runtime: str = "torch"  # score: torch, or the model's export/<runtime>


_FETCHED: dict[str, Any] = {}


def fetch(spec: Any) -> Any:
    """A spec from its object reference, fetched once per worker process (the last two kept)."""
    import ray

    if not isinstance(spec, ray.ObjectRef):
        return spec
    key = spec.hex()
    if key not in _FETCHED:
        while len(_FETCHED) >= 2:
            _FETCHED.pop(next(iter(_FETCHED)))
        _FETCHED[key] = ray.get(spec)
    return _FETCHED[key]


def _columns(rows: list[dict[str, Any]], names: tuple[str, ...]) -> dict[str, np.ndarray]:
    out = {}
    for name in names:
        values = [r[name] for r in rows]
        if name in _INTS[names]:
            out[name] = np.asarray(values, dtype=np.int64)
        else:
            column = np.empty(len(values), dtype=object)
            column[:] = values
            out[name] = column
    return out


class Known:
    """Membership in a sorted array of 16-byte content hashes (shared, not copied into a set)."""

    def __init__(self, hashes: np.ndarray | None) -> None:
        self.hashes = hashes

    def __contains__(self, digest: bytes) -> bool:
        a = self.hashes
        if a is None or not len(a):
            return False
        probe = np.array([digest], dtype=a.dtype)
        i = int(np.searchsorted(a, probe)[0])
        return i < len(a) and bool((a[i:i + 1] == probe)[0])


# ------------------------------------------------------------------------------------------ CPU tasks
def prepare(batch: dict[str, np.ndarray], spec: Any) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: each row names a partition; out comes its prepared images."""
    spec = fetch(spec)
    return _columns([prepare_partition(spec, int(k)) for k in batch["part"]], PREPARED)


def prepare_partition(spec: PrepareSpec, number: int) -> dict[str, Any]:
    from PIL import Image

    from oodscope.features.extract import _Prepared
    from oodscope.io import ImageSource

    ImageSource.max_pixels = spec.max_pixels  # the driver's limit (--max-pixels), in this process too
    Image.MAX_IMAGE_PIXELS = spec.pil_max_pixels
    source = spec.source
    start = number * spec.partition_size
    stop = min(start + spec.partition_size, spec.n)
    prepared = _Prepared(source, spec.input_spec, Known(spec.known))
    ids = [source.item_id(i) for i in range(start, stop)]
    positions, hashes, computed, pixels, failures = [], [], [], [], []
    for j, i in enumerate(range(start, stop)):
        _, digest, px, error = prepared[i]
        if error is not None:
            failures.append([j, ids[j], error])
            continue
        positions.append(j)
        hashes.append(digest)
        computed.append(px is not None)
        if px is not None:
            pixels.append(px)
    return {
        "part": number, "start": start, "n": stop - start, "item_ids": json.dumps(ids),
        "ok_pos": np.asarray(positions, dtype=np.int64).tobytes(), "ok_hash": b"".join(hashes),
        "computed": np.asarray(computed, dtype=bool).tobytes(),
        "pixels": np.stack(pixels).tobytes() if pixels else b"", "failures": json.dumps(failures),
    }


# ------------------------------------------------------------------------------------------ actors
class ChunkWriter(FeatureStore):
    """Writes chunks of one partition each into an existing feature store, under names it is given
    (:func:`~oodscope.engines.jobs.chunk_name`); it never reads the store's index."""

    def __init__(self, root: str, config: dict[str, Any]) -> None:  # no index scan, unlike the store
        self.root = Path(root)
        self.config = config
        self.index = {}
        self._chunks = []
        self._name = ""

    def _new_chunk_path(self) -> Path:
        return self.root / "chunks" / self._name

    def write(self, name: str, hashes: list[bytes], features: Any) -> None:
        self._name = name
        self.append(hashes, features)
        self.index.clear()
        self._chunks.clear()


def model_folder(files: dict[str, bytes]) -> Path:
    """The saved model unpacked once per node, under the temporary directory and named by its content
    (every actor of every job on that node loads it from there; exported networks are read lazily)."""
    from oodscope.engines.jobs import files_key

    root = Path(tempfile.gettempdir()) / "oodscope-ray-models"
    target = root / files_key(files)
    if not (target / "model.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=root))
        unpack_files(files, staging)
        try:
            os.replace(staging, target)  # atomic: another actor may have put it there first
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    return target


class Forward:
    """Ray Data actor: one backbone (and, for ``score``, the loaded OODModel) per actor."""

    def __init__(self, spec: Any) -> None:
        from oodscope.backbones import create_shared
        from oodscope.backbones.base import derived_from
        from oodscope.features.extract import backbone_config

        spec = fetch(spec)
        self.spec = spec
        self.model = None
        if spec.kind == "score":
            from oodscope.pipeline import OODModel

            folder = model_folder(spec.model_files)
            self.model = OODModel.load(folder, backbone=spec.backbone, device=spec.device, progress=False,
                                       runtime=spec.runtime)
            backbone = self.model.backbone
        else:
            backbone = spec.backbone
            if isinstance(backbone, str):
                options = dict(spec.backbone_options)
                if spec.device is not None:
                    options["device"] = spec.device
                backbone = create_shared(backbone, **options)
        self.network, self.derive = derived_from(backbone)
        if spec.kind == "extract":
            here = backbone_config(self.network)
            if here != spec.config:
                raise RuntimeError(f"the backbone on this Ray worker has configuration {here}, the job's feature "
                                   f"store was made for {spec.config}: install the same weights on every node")
            self.writer = ChunkWriter(spec.store_root, spec.config)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [self.partition({name: batch[name][r] for name in PREPARED}) for r in range(len(batch["part"]))]
        return _columns(rows, SUMMARY)

    def features(self, pixels: np.ndarray):
        from oodscope.backbones.base import Features
        from oodscope.backbones.preprocess import normalize_batch

        size = self.spec.batch_size
        parts = [self.network.encode_images(normalize_batch(pixels[b:b + size], self.network.input_spec,
                                                            self.network.device))
                 for b in range(0, len(pixels), size)]
        return Features.concatenate(parts)

    def partition(self, row: dict[str, Any]) -> dict[str, Any]:
        number, start, n = int(row["part"]), int(row["start"]), int(row["n"])
        positions = np.frombuffer(row["ok_pos"], dtype=np.int64)
        raw = row["ok_hash"]
        hashes = [bytes(raw[16 * i:16 * i + 16]) for i in range(len(positions))]
        computed = np.frombuffer(row["computed"], dtype=bool)
        failures = json.loads(row["failures"])
        feats = None
        if computed.any():
            side = self.network.input_spec.size
            pixels = np.frombuffer(bytearray(row["pixels"]), dtype=np.uint8).reshape(-1, side, side, 3)
            feats = self.features(pixels)
        summary = {"part": number, "n": n, "ok": len(positions), "computed": int(computed.sum()),
                   "cached": int(len(positions) - computed.sum()), "failed": len(failures), "ood": 0,
                   "failures": json.dumps([[item, reason] for _, item, reason in failures])}
        if self.spec.kind == "score":
            summary["ood"] = self._score(number, n, json.loads(row["item_ids"]), positions, hashes, failures, feats)
        else:
            self._store(number, start, n, positions, hashes, computed, failures, feats)
        return summary

    def _score(self, number, n, ids, positions, hashes, failures, feats) -> int:
        from oodscope.features.extract import LoadFailure
        from oodscope.pipeline.decisions import predict_chunk
        from oodscope.pipeline.inputs import ModelData

        if feats is not None and self.derive is not None:
            feats = self.derive(feats)
        data = ModelData(n=n, indices=np.asarray(positions, dtype=np.int64), item_ids=[ids[j] for j in positions],
                         hashes=hashes, labels=None,
                         failures=[LoadFailure(j, item, reason) for j, item, reason in failures],
                         features=feats if len(positions) else None)
        predictions = predict_chunk(self.model, data)
        write_score_partition(Path(self.spec.out_dir) / part_name(number, ".parquet"), predictions.to_dicts())
        return int(predictions.ood[predictions.ok].sum())

    def _store(self, number, start, n, positions, hashes, computed, failures, feats) -> None:
        new = [h for h, c in zip(hashes, computed, strict=True) if c]
        if new:
            self.writer.write(chunk_name(number, new), new, feats)
        record = {"part": number, "start": start, "n": n,
                  "ok": [[start + int(j), h.hex()] for j, h in zip(positions, hashes, strict=True)],
                  "computed": len(new), "cached": len(hashes) - len(new),
                  "failures": [[start + j, item, reason] for j, item, reason in failures]}
        write_record(Path(self.spec.records) / part_name(number, ".json"), record)
