"""Image- and pixel-level anomaly-detection metrics: image AUROC / AUPR / F1-max, pixel AUROC, AUPRO.

Conventions: scores and maps are higher = more anomalous; labels and masks are 1 (True) = defective.
Image AUROC and AUPR are :func:`oodscope.evaluation.metrics.auroc` / ``aupr_out`` with the good
images as the ID side (exact with ties, = scikit-learn). F1-max is the best F1 over every threshold
("defective" when ``score >= t``), as anomalib's ``F1Max``.

AUPRO follows the MVTec AD evaluation code (Bergmann et al., "The MVTec Anomaly Detection Dataset",
IJCV 2021; ``mvtec_ad_evaluation/pro_curve_util.py`` and ``generic_util.trapezoid``):

* the regions are the connected components (8-connectivity, ``scipy.ndimage.label`` with a 3x3
  structure of ones) of every ground-truth mask;
* at each threshold t (every distinct map value, "defective" when ``value >= t``), PRO(t) is the
  mean over all regions of all images of the fraction of the region's pixels that are flagged, and
  FPR(t) the fraction of the normal pixels (mask 0, in all images) that are flagged;
* the curve is prefixed with (0, 0) and ended with (1, 1), integrated with the trapezoid rule up to
  FPR = ``fpr_limit`` (0.3), interpolating linearly at the limit, and divided by the limit.

Everything is exact (one sort of the pooled pixels and cumulative sums, as in the official code).
"""

from __future__ import annotations

from bisect import bisect
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from oodscope.evaluation.metrics import _as_scores, _tied_counts, aupr_out, auroc

__all__ = [
    "anomaly_metrics",
    "aupro",
    "f1_max",
    "image_metrics",
    "pixel_auroc",
    "pro_curve",
    "trapezoid",
]

#: 8-connectivity, as the MVTec AD evaluation code (``structure = np.ones((3, 3))``).
_STRUCTURE = np.ones((3, 3), dtype=int)


def _split(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    s = _as_scores(scores, "scores")
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in shape")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (good) or 1 (defective)")
    good, bad = s[y == 0], s[y == 1]
    if not good.size or not bad.size:
        raise ValueError(f"image metrics need good and defective images, got {good.size} good and {bad.size} "
                         "defective")
    return good, bad


def f1_max(labels: Any, scores: Any) -> tuple[float, float]:
    """(best F1, its threshold) over all thresholds t, flagging ``score >= t``."""
    good, bad = _split(labels, scores)
    values, c_good, c_bad = _tied_counts(good, bad)
    tp = np.cumsum(c_bad[::-1])  # flagged defective when t = values[::-1][k]
    fp = np.cumsum(c_good[::-1])
    f1 = 2.0 * tp / (tp + fp + bad.size)  # 2 TP / (2 TP + FP + FN), FN = P - TP
    k = int(np.argmax(f1))
    return float(f1[k]), float(values[::-1][k])


def image_metrics(labels: Any, scores: Any) -> dict[str, float | int]:
    """Image AUROC, AUPR (defective = positive), F1-max and its threshold, and the counts."""
    good, bad = _split(labels, scores)
    best, thr = f1_max(labels, scores)
    return {"image_auroc": auroc(good, bad), "image_aupr": aupr_out(good, bad), "image_f1_max": best,
            "image_f1_threshold": thr, "n_good": int(good.size), "n_defective": int(bad.size)}


def _pixels(masks: Any, maps: Any) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Masks and maps as lists of matching 2-D arrays (bool, float64); clear errors otherwise."""
    ms = list(masks) if not isinstance(masks, np.ndarray) or masks.ndim == 3 else [masks]
    ps = list(maps) if not isinstance(maps, np.ndarray) or maps.ndim == 3 else [maps]
    if len(ms) != len(ps):
        raise ValueError(f"{len(ms)} masks but {len(ps)} maps")
    if not ms:
        raise ValueError("no masks given")
    out_m, out_p = [], []
    for i, (m, p) in enumerate(zip(ms, ps, strict=True)):
        m, p = np.asarray(m), np.asarray(p, dtype=np.float64)
        if m.ndim != 2 or m.shape != p.shape:
            raise ValueError(f"image {i}: mask {m.shape} and map {p.shape} must be the same 2-D shape (bring maps "
                             "to the masks' size first, e.g. with oodscope.detectors._anomaly.upsample_maps)")
        if not np.isfinite(p).all():
            raise ValueError(f"image {i}: the map has {int((~np.isfinite(p)).sum())} non-finite value(s)")
        out_m.append(m.astype(bool))
        out_p.append(p)
    return out_m, out_p


def pixel_auroc(masks: Any, maps: Any) -> float:
    """AUROC over all pixels of all images (defective pixels = positive)."""
    ms, ps = _pixels(masks, maps)
    m = np.concatenate([a.ravel() for a in ms])
    p = np.concatenate([a.ravel() for a in ps])
    if m.all() or not m.any():
        raise ValueError("pixel AUROC needs both defective and normal pixels in the masks")
    return auroc(p[~m], p[m])


def pro_curve(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at every distinct map value, with (0, 0) first and (1, 1) last (MVTec AD's definition)."""
    ms, ps = _pixels(masks, maps)
    fp_change, pro_change = [], []
    n_regions, n_normal = 0, 0
    for m in ms:
        labelled, k = ndimage.label(m, structure=_STRUCTURE)
        n_regions += k
        ok = labelled == 0
        n_normal += int(ok.sum())
        fp_change.append(ok.ravel().astype(np.float64))
        # Each pixel of a region adds 1 / |region| to that region's overlap when it is flagged.
        sizes = np.bincount(labelled.ravel(), minlength=k + 1).astype(np.float64)
        weight = np.where(labelled > 0, 1.0 / np.maximum(sizes[labelled], 1.0), 0.0)
        pro_change.append(weight.ravel())
    if n_regions == 0:
        raise ValueError("AUPRO needs at least one defect region: every mask is empty")
    if n_normal == 0:
        raise ValueError("AUPRO needs normal pixels: every pixel of every mask is defective")
    scores = np.concatenate([p.ravel() for p in ps])
    order = np.argsort(-scores, kind="stable")  # descending
    s_sorted = scores[order]
    fprs = np.cumsum(np.concatenate(fp_change)[order]) / n_normal
    pros = np.cumsum(np.concatenate(pro_change)[order]) / n_regions
    keep = np.append(np.diff(s_sorted) != 0, True)  # the last pixel of each run of equal values
    fprs = np.clip(fprs[keep], 0.0, 1.0)
    pros = np.clip(pros[keep], 0.0, 1.0)
    return np.concatenate([[0.0], fprs, [1.0]]), np.concatenate([[0.0], pros, [1.0]])


def trapezoid(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, x_max: float | None = None) -> float:
    """Area under the piecewise-linear curve (x ascending) up to ``x_max`` (interpolated there)."""
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    correction = 0.0
    if x_max is not None:
        if x_max not in xa:
            ins = bisect(xa.tolist(), x_max)
            if not 0 < ins < len(xa):
                raise ValueError(f"x_max={x_max} is outside the curve's range [{xa[0]}, {xa[-1]}]")
            y_at = ya[ins - 1] + (ya[ins] - ya[ins - 1]) * (x_max - xa[ins - 1]) / (xa[ins] - xa[ins - 1])
            correction = 0.5 * (y_at + ya[ins - 1]) * (x_max - xa[ins - 1])
        keep = xa <= x_max
        xa, ya = xa[keep], ya[keep]
    return float(np.sum(0.5 * (ya[1:] + ya[:-1]) * np.diff(xa)) + correction)


def aupro(masks: Any, maps: Any, fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve up to FPR ``fpr_limit``, divided by ``fpr_limit`` (1 = perfect)."""
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fprs, pros = pro_curve(masks, maps)
    return trapezoid(fprs, pros, x_max=fpr_limit) / fpr_limit


def anomaly_metrics(labels: Any, scores: Any, masks: Any = None, maps: Any = None, *,
                    fpr_limit: float = 0.3) -> dict[str, float | int]:
    """Image metrics, plus pixel AUROC and AUPRO when ``masks`` and ``maps`` are given."""
    out: dict[str, float | int] = dict(image_metrics(labels, scores))
    if (masks is None) != (maps is None):
        raise ValueError("pass both masks and maps for the pixel metrics, or neither")
    if masks is not None:
        out["pixel_auroc"] = pixel_auroc(masks, maps)
        out["aupro"] = aupro(masks, maps, fpr_limit)
        out["aupro_fpr_limit"] = fpr_limit
    return out
