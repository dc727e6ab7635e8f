"""Feature extraction: stream a dataset through a backbone, batch by batch, with a progress bar.

Reading, hashing, decoding and resizing run in DataLoader workers; normalization and the forward
pass run in the main process on the backbone's device. One unreadable file never stops the run:
it is reported (index, id, reason) and every other image is processed. With a ``cache_dir`` the
features go to a :class:`~oodscope.features.store.FeatureStore` chunk by chunk (memory stays flat
in the number of images) and a re-run — or a run resumed after an interruption — only pays for
reading and hashing the images already done.

Dense feature maps (``Features.dense``, for image anomaly detection) are float16 from the backbone
on (:mod:`oodscope.backbones.dense`), so cached and freshly computed features are identical; chunks
are cut by size as well as by count (``chunk_bytes``), so a run with dense maps holds at most one
chunk of them in memory whatever the number of images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset

from oodscope.backbones.base import PER_IMAGE_FIELDS, Features, derived_from
from oodscope.backbones.dense import DENSE_DTYPE
from oodscope.backbones.preprocess import normalize_batch, prepare_pixels
from oodscope.features.store import HASH_BYTES, FeatureStore
from oodscope.io.images import ImageLoadError


@dataclass(frozen=True)
class LoadFailure:
    index: int
    item_id: str
    reason: str


@dataclass
class ExtractionResult:
    """Features of the images that loaded, in dataset order, and the ones that did not.

    For a derived backbone (see :func:`~oodscope.backbones.base.derived_from`) the store holds the
    network's features and ``derive`` converts them on the way out: :attr:`features` and
    :meth:`iter_features` give the derived backbone's features, :meth:`as_derived` another
    backbone's view of the same extraction.
    """

    indices: np.ndarray  # dataset positions of the rows
    item_ids: list[str]
    hashes: list[bytes]
    labels: np.ndarray | None
    failures: list[LoadFailure]
    n_computed: int
    n_cached: int
    seconds: float
    store: FeatureStore | None = None
    _features: Features | None = field(default=None, repr=False)
    derive: Callable[[Features], Features] | None = field(default=None, repr=False)
    #: Seconds spent converting network features into the derived backbone's (``derive``).
    derive_seconds: float = 0.0
    _derived: Features | None = field(default=None, repr=False)

    @property
    def network_features(self) -> Features:
        """The network's own rows, in memory (loaded from the store on first access)."""
        if self._features is None:
            if self.store is None:
                raise RuntimeError("no features were kept")
            self._features = self.store.gather(self.hashes)
        return self._features

    @property
    def features(self) -> Features:
        """All rows in memory, as the backbone that was asked for sees them."""
        if self.derive is None:
            return self.network_features
        if self._derived is None:
            self._derived = self._apply(self.network_features)
        return self._derived

    def iter_features(self, batch_size: int | None = None) -> Iterator[tuple[np.ndarray, Features]]:
        """Stream (dataset indices, Features) in batches without loading everything.

        ``batch_size`` None: 4096 rows, fewer when a row is large (dense maps) so that a batch holds
        about :data:`BATCH_BYTES`."""
        if batch_size is None:
            per_row = self.store.row_bytes() if self.store is not None and self._features is None else 0
            batch_size = max(1, min(4096, BATCH_BYTES // per_row)) if per_row else 4096
        for start in range(0, len(self.hashes), batch_size):
            stop = start + batch_size
            if self._derived is not None:
                yield self.indices[start:stop], self._derived.subset(slice(start, stop))
            elif self._features is not None:
                yield self.indices[start:stop], self._apply(self._features.subset(slice(start, stop)))
            else:
                yield self.indices[start:stop], self._apply(self.store.gather(self.hashes[start:stop]))

    def as_derived(self, derive: Callable[[Features], Features] | None) -> ExtractionResult:
        """The same extraction seen through another conversion (``None``: the network's own features)."""
        return dataclasses.replace(self, derive=derive, derive_seconds=0.0, _derived=None)

    def _apply(self, feats: Features) -> Features:
        if self.derive is None:
            return feats
        started = time.perf_counter()
        out = self.derive(feats)
        self.derive_seconds += time.perf_counter() - started
        return out


#: Target size of one streamed batch of :meth:`ExtractionResult.iter_features` and of one cache chunk.
BATCH_BYTES = 64 * 2**20


def content_hash(raw: bytes) -> bytes:
    return hashlib.blake2b(raw, digest_size=HASH_BYTES).digest()


def backbone_config(backbone) -> dict:
    """Everything that changes a backbone's output for the same image bytes (the cache key): the
    resolution and geometry are in ``preprocessing``, dense layers (when asked for) in ``dense``."""
    config = {
        "backbone_id": backbone.id,
        "weights": backbone.weights_fingerprint(),
        "preprocessing": backbone.input_spec.key(),
        # which local features, where a backbone has several kinds (hf: "dense" or "tokens")
        "patches": (getattr(backbone, "patch_kind", None) or True) if getattr(backbone, "want_patches", False)
        else False,
        "layers": bool(getattr(backbone, "want_layers", False)),
    }
    dense = list(getattr(backbone, "dense_layers", None) or ())
    if dense:  # only then, so that the stores of backbones without dense maps keep their keys
        config["dense"] = dense
    return config


def store_dir(cache_dir: str | os.PathLike, config: dict) -> Path:
    key = hashlib.sha256(repr(sorted(config.items())).encode()).hexdigest()[:16]
    safe_id = "".join(c if c.isalnum() or c in "-_." else "_" for c in config["backbone_id"])
    return Path(cache_dir) / f"{safe_id}-{key}"


def _nbytes(features: Features) -> int:
    """Bytes of a batch's per-image arrays."""
    arrays = [getattr(features, n) for n in PER_IMAGE_FIELDS]
    arrays += list(features.layers.values()) + list(features.dense.values())
    return sum(a.nbytes for a in arrays if a is not None)


class _Prepared(Dataset):
    """Worker side: read -> hash -> (skip if cached) -> decode -> resize."""

    def __init__(self, source, spec, known: set[bytes]) -> None:
        self.source, self.spec, self.known = source, spec, known

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        try:
            raw = self.source.read(i)
            digest = content_hash(raw)
            if digest in self.known:
                return i, digest, None, None
            pixels = prepare_pixels(self.source.decode(i, raw), self.spec)
            return i, digest, pixels, None
        except ImageLoadError as exc:
            return i, None, None, exc.reason
        except Exception as exc:  # noqa: BLE001 - any per-image failure is reported, not fatal
            return i, None, None, f"{type(exc).__name__}: {exc}"


def _collate(items):
    with_pixels = [it for it in items if it[2] is not None]
    pixels = np.stack([it[2] for it in with_pixels]) if with_pixels else None
    return items, pixels


def extract(
    backbone,
    source,
    *,
    batch_size: int = 64,
    num_workers: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    chunk_size: int = 2048,
    chunk_bytes: int = BATCH_BYTES,
    progress: bool = True,
    keep_in_memory: bool = True,
    description: str = "extract",
) -> ExtractionResult:
    """Run ``backbone`` over every image of ``source`` (an :class:`oodscope.io.ImageSource`).

    A derived backbone (ConSE) runs its network and converts the features on the way out, so the
    cache is the network's and serves every backbone derived from it. ``cache_dir``: where feature
    stores live (one sub-folder per backbone configuration).
    ``keep_in_memory=False`` (needs ``cache_dir``) keeps memory flat: read results back with
    :meth:`ExtractionResult.iter_features`. A chunk is written every ``chunk_size`` images or
    ``chunk_bytes`` bytes of features, whichever comes first.
    """
    from tqdm.auto import tqdm

    if not keep_in_memory and cache_dir is None:
        raise ValueError("keep_in_memory=False needs a cache_dir to stream features to")
    backbone, derive = derived_from(backbone)
    started = time.perf_counter()
    store = FeatureStore(store_dir(cache_dir, cfg := backbone_config(backbone)), cfg) if cache_dir else None
    known = set(store.index) if store is not None else set()
    if num_workers is None:
        num_workers = min(2, max(0, (os.cpu_count() or 1) - 1))
    loader = DataLoader(
        _Prepared(source, backbone.input_spec, known),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate,
        prefetch_factor=4 if num_workers else None,
    )
    ok_index: list[int] = []
    ok_hash: list[bytes] = []
    failures: list[LoadFailure] = []
    pending_hashes: list[bytes] = []
    pending: list[Features] = []
    pending_bytes = 0
    in_memory: list[Features] = []
    memory_rows: dict[bytes, tuple[int, int]] = {}
    n_computed = n_cached = 0

    def flush() -> None:
        nonlocal pending_bytes
        if store is not None and pending:
            store.append(list(pending_hashes), Features.concatenate(pending))
            pending.clear()
            pending_hashes.clear()
            pending_bytes = 0

    bar = tqdm(total=len(source), unit="img", desc=description, disable=not progress, dynamic_ncols=True)
    try:
        for items, pixels in loader:
            computed = None
            if pixels is not None:
                batch = normalize_batch(pixels, backbone.input_spec, backbone.device)
                computed = backbone.encode_images(batch)
                if any(v.dtype != DENSE_DTYPE for v in computed.dense.values()):  # as the cache stores them
                    computed.dense = {k: np.asarray(v, dtype=DENSE_DTYPE) for k, v in computed.dense.items()}
            row = 0
            new_hashes = []
            for index, digest, px, error in items:
                if error is not None:
                    failures.append(LoadFailure(index, source.item_id(index), error))
                    continue
                ok_index.append(index)
                ok_hash.append(digest)
                if px is None:
                    n_cached += 1
                else:
                    new_hashes.append(digest)
                    if store is None:
                        memory_rows.setdefault(digest, (len(in_memory), row))
                    row += 1
            if computed is not None:
                n_computed += len(computed)
                if store is not None:
                    pending.append(computed)
                    pending_hashes.extend(new_hashes)
                    pending_bytes += _nbytes(computed)
                    if len(pending_hashes) >= chunk_size or pending_bytes >= chunk_bytes:
                        flush()
                else:
                    in_memory.append(computed)
            bar.update(len(items))
            if failures:
                bar.set_postfix(failed=len(failures), refresh=False)
        flush()
    finally:
        bar.close()

    labels = None
    if getattr(source, "labels", None) is not None:
        labels = np.asarray(source.labels)[np.asarray(ok_index, dtype=np.int64)]
    result = ExtractionResult(
        indices=np.asarray(ok_index, dtype=np.int64),
        item_ids=[source.item_id(i) for i in ok_index],
        hashes=ok_hash,
        labels=labels,
        failures=failures,
        n_computed=n_computed,
        n_cached=n_cached,
        seconds=time.perf_counter() - started,
        store=store,
        derive=derive,
    )
    if store is None and in_memory:
        everything = Features.concatenate(in_memory)
        offsets = np.cumsum([0] + [len(f) for f in in_memory])
        order = np.array([offsets[memory_rows[h][0]] + memory_rows[h][1] for h in ok_hash], dtype=np.int64)
        result._features = everything.subset(order)
    elif store is not None and keep_in_memory and ok_hash:
        result._features = store.gather(ok_hash)
    return result
