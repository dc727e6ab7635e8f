"""Held-out calibration data: the seeded fit/calibration split and the content ids it relies on.

Conformal guarantees need calibration images the detector never saw, and exchangeable with the
test images. Three helpers serve that:

* :func:`split_calibration` — a seeded split, stratified by class, that keeps images with the same
  content on one side;
* :func:`item_digests` / :func:`feature_row_digests` — 16-byte content ids of images (their
  content hashes) or of precomputed feature rows (a hash of the embedding bytes), for
  :func:`oodscope.calibration.check_disjoint`;
* :func:`content_uniforms` — one uniform in [0, 1) per image, a keyed hash of its content id: the
  randomized prediction-set scores (APS/RAPS) then draw the same ``u`` for an image at calibration
  and at test time, whatever batch it comes in.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

DIGEST_BYTES = 16


def item_digests(ids: Sequence[Any]) -> list[bytes]:
    """16-byte digests of item ids (content hashes of that size are kept as they are)."""
    return [
        i if isinstance(i, bytes) and len(i) == DIGEST_BYTES
        else hashlib.blake2b(str(i).encode(), digest_size=DIGEST_BYTES).digest()
        for i in ids
    ]


def feature_row_digests(embedding: np.ndarray) -> list[bytes]:
    """A content id per row of precomputed features: the hash of its embedding bytes."""
    emb = np.ascontiguousarray(embedding)
    return [hashlib.blake2b(row.tobytes(), digest_size=DIGEST_BYTES).digest() for row in emb]


def content_uniforms(seed: int, digests: Sequence[bytes]) -> np.ndarray:
    """One uniform in [0, 1) per content digest: 53 bits of a BLAKE2b hash keyed by ``seed``."""
    words = [
        int.from_bytes(hashlib.blake2b(d, digest_size=8, key=str(seed).encode()).digest(), "little") >> 11
        for d in digests
    ]
    return np.asarray(words, dtype=np.float64) * 2.0**-53


def split_calibration(
    hashes: Sequence[bytes], labels: np.ndarray | None, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices ``(fit, calibration)``: a seeded split, stratified by label.

    Rows with the same content hash form one group and stay on one side (a duplicate in both parts
    would be a calibration image the detector has seen). Per class, ``round(fraction * groups)``
    groups go to calibration, at least one and leaving at least one for fitting when the class has
    two or more groups.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"calibration_fraction must be in (0, 1), got {fraction}")
    first: dict[bytes, int] = {}
    group_of = np.empty(len(hashes), dtype=np.int64)
    for row, h in enumerate(hashes):
        group_of[row] = first.setdefault(h, len(first))
    group_rows = np.array(list(first.values()), dtype=np.int64)  # first row of each group
    group_label = labels[group_rows] if labels is not None else np.zeros(len(group_rows), dtype=np.int64)
    rng = np.random.default_rng(seed)
    cal_groups: list[np.ndarray] = []
    for lab in np.unique(group_label):
        members = np.flatnonzero(group_label == lab)
        n_cal = math.floor(fraction * len(members) + 0.5)
        n_cal = min(max(n_cal, 1), len(members) - 1) if len(members) >= 2 else 0
        cal_groups.append(members[rng.permutation(len(members))[:n_cal]])
    is_cal_group = np.zeros(len(group_rows), dtype=bool)
    if cal_groups:
        is_cal_group[np.concatenate(cal_groups)] = True
    is_cal = is_cal_group[group_of]
    return np.flatnonzero(~is_cal), np.flatnonzero(is_cal)
