"""On-disk feature store: chunks of features keyed by image content hash.

Layout of a store directory (one per backbone configuration)::

    manifest.json            backbone id, weights fingerprint, preprocessing, fields (informational)
    model.safetensors        per-model arrays (last-layer weight/bias) — written once
    chunks/chunk-<time>-<pid>-<random>.safetensors   per-image arrays + their content hashes

Per-image arrays are stored under their field name; pooled layers as ``layers.<name>`` and dense
feature maps (``Features.dense``) as ``dense.<name>``, always float16 (N, C, h, w): a dense map is
the bulk of a chunk, and float16 halves it (anomaly detectors compute in float32).

Every file is written to a temporary name and renamed into place, so a crash (even ``kill -9``)
leaves only complete chunks behind. The set of chunk files *is* the index: on start-up the store
reads every chunk's hashes, so work done before an interruption is found again. Chunk names are
unique per writer, so two processes filling the same store never overwrite each other (images
both computed are stored twice, harmlessly). No pickle: arrays are safetensors, metadata JSON.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from oodscope.backbones.base import PER_IMAGE_FIELDS, Features

HASH_BYTES = 16
_LAYER_PREFIX = "layers."
_DENSE_PREFIX = "dense."


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


_SAFETENSORS_DTYPES = {"F16": "f2", "BF16": "f2", "F32": "f4", "F64": "f8", "U8": "u1", "I8": "i1", "I16": "i2",
                       "I32": "i4", "I64": "i8", "BOOL": "u1"}


def atomic_save_arrays(path: Path, arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file to a temporary name and rename it into place (no copy of the arrays as
    bytes in memory: a chunk of dense maps is large)."""
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(arrays, tmp, metadata=metadata)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass(frozen=True)
class Location:
    chunk: int
    row: int


class FeatureStore:
    """Append-only store of per-image features, looked up by 16-byte content hash."""

    def __init__(self, root: str | os.PathLike, config: dict) -> None:
        self.root = Path(root)
        self.config = config
        manifest = self.root / "manifest.json"
        if manifest.is_file():
            existing = json.loads(manifest.read_text())
            if existing.get("config") != config:
                raise ValueError(
                    f"feature store {self.root} was made with another backbone configuration:\n"
                    f"  stored: {existing.get('config')}\n  wanted: {config}"
                )
        else:
            atomic_write_bytes(manifest, json.dumps({"format": "oodscope-features", "format_version": 1,
                                                     "config": config}, indent=2).encode())
        (self.root / "chunks").mkdir(parents=True, exist_ok=True)
        self.index: dict[bytes, Location] = {}
        self._chunks: list[Path] = []
        for path in sorted((self.root / "chunks").glob("chunk-*.safetensors")):
            number = len(self._chunks)
            self._chunks.append(path)
            for row, digest in enumerate(self._read_hashes(path)):
                self.index.setdefault(bytes(digest), Location(number, row))

    # ------------------------------------------------------------------ writing
    def _chunk_path(self, number: int) -> Path:
        return self._chunks[number]

    def _new_chunk_path(self) -> Path:
        unique = f"{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}"
        return self.root / "chunks" / f"chunk-{unique}.safetensors"

    def write_model_fields(self, features: Features) -> None:
        from safetensors.numpy import save

        path = self.root / "model.safetensors"
        if path.is_file():
            return
        arrays = {k: np.ascontiguousarray(v) for k in ("weight", "bias")
                  if (v := getattr(features, k)) is not None}
        meta = {"logit_scale": json.dumps(features.logit_scale), "class_names": json.dumps(features.class_names),
                "backbone_id": json.dumps(features.backbone_id)}
        if not arrays:  # safetensors needs at least one tensor
            arrays = {"_empty": np.zeros(0, dtype=np.float32)}
        atomic_write_bytes(path, save(arrays, metadata=meta))

    def append(self, hashes: list[bytes], features: Features) -> None:
        """Write one chunk holding ``features`` for images with these content hashes."""

        if len(hashes) != len(features):
            raise ValueError("one hash per feature row is required")
        if not hashes:
            return
        self.write_model_fields(features)
        arrays = {"hash": np.frombuffer(b"".join(hashes), dtype=np.uint8).reshape(-1, HASH_BYTES)}
        for name in PER_IMAGE_FIELDS:
            value = getattr(features, name)
            if value is not None:
                arrays[name] = np.ascontiguousarray(value)
        for name, value in features.layers.items():
            arrays[_LAYER_PREFIX + name] = np.ascontiguousarray(value)
        for name, value in features.dense.items():
            arrays[_DENSE_PREFIX + name] = np.ascontiguousarray(value, dtype=np.float16)
        path = self._new_chunk_path()
        atomic_save_arrays(path, arrays)
        number = len(self._chunks)
        self._chunks.append(path)
        for row, digest in enumerate(hashes):
            self.index.setdefault(digest, Location(number, row))

    # ------------------------------------------------------------------ reading
    @staticmethod
    def _read_hashes(path: Path) -> np.ndarray:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as fh:
            return fh.get_tensor("hash")

    def __contains__(self, digest: bytes) -> bool:
        return digest in self.index

    def __len__(self) -> int:
        return len(self.index)

    def model_fields(self) -> dict:
        from safetensors import safe_open

        path = self.root / "model.safetensors"
        if not path.is_file():
            return {}
        with safe_open(str(path), framework="numpy") as fh:
            out = {k: fh.get_tensor(k) for k in fh.keys() if k != "_empty"}
            meta = fh.metadata() or {}
        out.update({k: json.loads(v) for k, v in meta.items()})
        return out

    def row_bytes(self) -> int:
        """Bytes of one stored image's arrays (from the first chunk's header; 0 for an empty store)."""
        from safetensors import safe_open

        if not self._chunks:
            return 0
        with safe_open(str(self._chunks[0]), framework="numpy") as fh:
            total = 0
            for name in fh.keys():
                part = fh.get_slice(name)
                shape = part.get_shape()
                rows = shape[0] if shape else 1
                total += int(np.prod(shape)) * np.dtype(_SAFETENSORS_DTYPES.get(part.get_dtype(), "f4")).itemsize \
                    // max(rows, 1)
        return total

    def gather(self, hashes: list[bytes]) -> Features:
        """Features for these content hashes, in this order (each must be in the store)."""
        from safetensors import safe_open

        locations = [self.index[h] for h in hashes]
        by_chunk: dict[int, list[tuple[int, int]]] = {}
        for position, loc in enumerate(locations):
            by_chunk.setdefault(loc.chunk, []).append((position, loc.row))
        columns: dict[str, np.ndarray] = {}
        for number, pairs in sorted(by_chunk.items()):
            positions = np.array([p for p, _ in pairs])
            rows = np.array([r for _, r in pairs])
            with safe_open(str(self._chunk_path(number)), framework="numpy") as fh:
                for name in fh.keys():
                    if name == "hash":
                        continue
                    block = fh.get_tensor(name)[rows]
                    if name not in columns:
                        columns[name] = np.empty((len(hashes), *block.shape[1:]), dtype=block.dtype)
                    columns[name][positions] = block
        model = self.model_fields()
        if "embedding" not in columns:
            columns["embedding"] = np.zeros((0, 0), dtype=np.float32)
        return Features(
            embedding=columns["embedding"],
            logits=columns.get("logits"),
            penultimate=columns.get("penultimate"),
            patches=columns.get("patches"),
            layers={k[len(_LAYER_PREFIX):]: v for k, v in columns.items() if k.startswith(_LAYER_PREFIX)},
            dense={k[len(_DENSE_PREFIX):]: v for k, v in columns.items() if k.startswith(_DENSE_PREFIX)},
            weight=model.get("weight"),
            bias=model.get("bias"),
            logit_scale=model.get("logit_scale"),
            class_names=model.get("class_names"),
            backbone_id=model.get("backbone_id"),
        )
