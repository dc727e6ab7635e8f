"""The model's front end: whatever the caller passes (images or precomputed features) becomes one
:class:`ModelData` — features of the rows that loaded, their content ids, labels and failures —
so that the model's core has a single path.

Images are extracted through the backbone (feature cache, per-image failures reported, derived
backbones handled by :func:`oodscope.features.extract.extract`); :class:`Features` are taken as
they are, identified by ``ids`` or by a hash of each embedding row.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from oodscope.backbones.base import Features
from oodscope.calibration.split import feature_row_digests, item_digests
from oodscope.io import ImageSource, describe_source, resolve_images


class OODModelError(ValueError):
    """An OODModel cannot do what was asked (bad configuration, wrong backbone, unsafe calibration)."""


@dataclass
class ModelData:
    """Rows of one input that the model can use, and the ones it could not read.

    ``n``: rows of the input; ``indices``: positions of the usable rows in it; ``hashes``: their
    content ids (for the fit/calibration overlap check); ``keys``: what seeds each row's APS/RAPS
    uniform (the same function of the content at calibration and at test time).
    """

    n: int
    indices: np.ndarray
    item_ids: list[str]
    hashes: list[bytes]
    labels: np.ndarray | None
    failures: list[Any]
    features: Features | None
    class_names: list[str] | None = None
    description: str = ""
    keys: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.keys:
            self.keys = list(self.hashes)

    def subset(self, rows: np.ndarray) -> ModelData:
        return ModelData(
            n=len(rows), indices=self.indices[rows], item_ids=[self.item_ids[i] for i in rows],
            hashes=[self.hashes[i] for i in rows], labels=None if self.labels is None else self.labels[rows],
            failures=[], features=None if self.features is None else self.features.subset(rows),
            class_names=self.class_names, description=self.description, keys=[self.keys[i] for i in rows],
        )


def as_image_source(images: Any, *, missing_ok: bool = False) -> ImageSource:
    """An image source from a source, a data spec, or a list of paths (:func:`oodscope.io.resolve_images`)."""
    try:
        return resolve_images(images, missing_ok=missing_ok)
    except (FileNotFoundError, ValueError) as err:
        raise OODModelError(str(err)) from None


def from_features(
    features: Features, labels: Any = None, ids: Sequence[Any] | None = None, class_names: Sequence[str] | None = None
) -> ModelData:
    """Precomputed features as model data: ids are ``ids`` (digested) or the hash of each embedding row."""
    n = len(features)
    lab = None if labels is None else np.asarray(labels, dtype=np.int64)
    if lab is not None and lab.shape != (n,):
        raise OODModelError(f"labels must have one entry per feature row ({n}), got shape {lab.shape}")
    if ids is not None and len(ids) != n:
        raise OODModelError(f"ids has {len(ids)} entries for {n} feature rows")
    row_digests = feature_row_digests(features.embedding)
    hashes = item_digests(ids) if ids is not None else row_digests
    names = [i.hex() if isinstance(i, bytes) else str(i) for i in ids] if ids is not None \
        else [str(i) for i in range(n)]
    if class_names is None and lab is not None and (lab >= 0).any():
        class_names = [str(k) for k in range(int(lab.max()) + 1)]
    return ModelData(n=n, indices=np.arange(n), item_ids=names, hashes=hashes, labels=lab, failures=[],
                     features=features, class_names=None if class_names is None else list(class_names),
                     description="features", keys=row_digests)


def from_images(backbone: Any, source: ImageSource, *, description: str, cache_dir: Any, batch_size: int,
                num_workers: int | None, progress: bool) -> ModelData:
    """Extract the features of an image source (per-image failures kept, the others scored)."""
    from oodscope.features.extract import extract

    result = extract(backbone, source, batch_size=batch_size, num_workers=num_workers, cache_dir=cache_dir,
                     progress=progress, description=description)
    names = getattr(source, "class_names", None)
    return ModelData(
        n=len(source), indices=result.indices, item_ids=result.item_ids, hashes=result.hashes,
        labels=result.labels, failures=result.failures, features=result.features if result.hashes else None,
        class_names=list(names) if names else None, description=describe_source(source),
    )


def map_labels(labels: np.ndarray | None, names: list[str] | None, classes: list[str] | None) -> np.ndarray | None:
    """Labels of a source, re-indexed to ``classes`` by name (exact or folder-safe name); -1 = unknown."""
    if labels is None or classes is None:
        return None
    labels = np.asarray(labels, dtype=np.int64)
    if names is None:
        return np.where((labels >= 0) & (labels < len(classes)), labels, -1)
    from oodscope.io import sanitize_class_name

    lookup = {c: k for k, c in enumerate(classes)}
    for k, c in enumerate(classes):
        lookup.setdefault(sanitize_class_name(c), k)
    remap = np.array([lookup.get(n, lookup.get(sanitize_class_name(n), -1)) for n in names] + [-1], dtype=np.int64)
    return remap[labels]


def unmatched_names(names: list[str] | None, classes: list[str] | None) -> tuple[list[str], list[str]]:
    """(folder names that match no class, class names that match no folder), by exact or folder-safe name."""
    if not names or not classes:
        return [], []
    from oodscope.io import sanitize_class_name

    def keys(x: str) -> set[str]:
        return {x, sanitize_class_name(x)}

    class_keys = set().union(*(keys(c) for c in classes))
    name_keys = set().union(*(keys(n) for n in names))
    return ([n for n in names if not keys(n) & class_keys], [c for c in classes if not keys(c) & name_keys])


def feature_chunks(features: Features, chunk_size: int, item_ids: Sequence[str] | None = None) -> Iterator[ModelData]:
    """Precomputed features as model data, ``chunk_size`` rows at a time (ids ``"0".."N-1"`` by default)."""
    n = len(features)
    ids = [str(i) for i in range(n)] if item_ids is None else list(item_ids)
    if len(ids) != n:
        raise OODModelError(f"item_ids has {len(ids)} entries for {n} feature rows")
    data = from_features(features)
    data.item_ids = ids
    for start in range(0, n, chunk_size):
        part = data.subset(np.arange(start, min(start + chunk_size, n)))
        part.indices = np.arange(len(part.indices))  # positions within the chunk
        yield part


def image_chunks(source: ImageSource, chunk_size: int, progress: bool) -> Iterator[ImageSource]:
    """Consecutive sub-sources of ``chunk_size`` images, with one progress bar over all of them."""
    from tqdm.auto import tqdm

    from oodscope.io import Subset

    with tqdm(total=len(source), unit="img", desc="score", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(source), chunk_size):
            yield Subset(source, np.arange(start, min(start + chunk_size, len(source))))
            bar.update(min(chunk_size, len(source) - start))

