"""Anomaly metrics against independent computations: scikit-learn for AUROC / AUPR / F1, and a slow
threshold-by-threshold port of the MVTec AD evaluation code's PRO definition (scipy.ndimage.label for
the regions) on hand-made masks, with edge cases (no defects, all-zero maps, ties, 8-connectivity)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from oodscope.evaluation.anomaly_metrics import (
    anomaly_metrics,
    aupro,
    f1_max,
    image_metrics,
    pixel_auroc,
    pro_curve,
    trapezoid,
)


def _brute_aupro(masks, maps, limit=0.3, connectivity=8):
    """PRO(t) = mean over regions of |region & (map >= t)| / |region|; FPR(t) over normal pixels; one
    threshold at a time, then (0, 0) ... (1, 1), trapezoid up to ``limit`` interpolated there, / limit."""
    structure = np.ones((3, 3)) if connectivity == 8 else ndimage.generate_binary_structure(2, 1)
    regions, normal = [], []
    for m in masks:
        lab, k = ndimage.label(m, structure=structure)
        regions += [lab == r for r in range(1, k + 1)]
        normal.append(lab == 0)
    pts = [(0.0, 0.0)]
    for t in sorted(set(np.concatenate([p.ravel() for p in maps]).tolist()), reverse=True):
        flagged = [p >= t for p in maps]
        fp = sum(int((f & n).sum()) for f, n in zip(flagged, normal, strict=True))
        fpr = fp / sum(int(n.sum()) for n in normal)
        overlaps = []
        for img, m in enumerate(masks):
            lab, k = ndimage.label(m, structure=structure)
            overlaps += [(flagged[img] & (lab == r)).sum() / (lab == r).sum() for r in range(1, k + 1)]
        pts.append((fpr, float(np.mean(overlaps))))
    pts.append((1.0, 1.0))
    x, y = np.array(pts).T
    # Area up to the limit: the points below it, plus the linearly interpolated point at it.
    below = x <= limit
    xs, ys = list(x[below]), list(y[below])
    if limit not in xs:
        j = int(np.argmax(x > limit))
        xs.append(limit)
        ys.append(y[j - 1] + (y[j] - y[j - 1]) * (limit - x[j - 1]) / (x[j] - x[j - 1]))
    area = sum((xs[i + 1] - xs[i]) * (ys[i + 1] + ys[i]) / 2 for i in range(len(xs) - 1))
    return area / limit


def _hand_masks():
    m = np.zeros((3, 10, 12), bool)
    m[0, 1:4, 1:5] = True  # a 12-pixel region
    m[0, 6, 8] = True  # a 1-pixel region
    m[1, 2:9, 3:6] = True
    m[1, 5, 9] = m[1, 6, 10] = True  # two pixels touching at a corner: one region with 8-connectivity
    return m  # image 2 is good (no region)


def test_aupro_matches_the_brute_force_port_on_hand_made_masks():
    masks = _hand_masks()
    rng = np.random.default_rng(0)
    for trial in range(6):
        maps = rng.normal(size=masks.shape) + (1.0 + trial * 0.3) * masks
        if trial % 2:
            maps = np.round(maps, 1)  # many ties
        for limit in (0.3, 0.05, 1.0):
            assert aupro(masks, maps, limit) == pytest.approx(_brute_aupro(masks, maps, limit), abs=1e-12)


def test_regions_are_8_connected_as_in_the_official_code():
    masks = np.zeros((1, 6, 6), bool)
    masks[0, 1, 1] = masks[0, 2, 2] = masks[0, 2, 3] = True  # (1, 1) touches the others at a corner only
    maps = np.zeros((1, 6, 6))
    maps[0, 1, 1] = 5.0  # finds the corner pixel first: PRO 1/3 (one region), 1/2 with 4-connectivity
    maps[0, 4, 4] = 3.0  # then a false positive
    maps[0, 2, 2] = 1.0
    got = aupro(masks, maps)
    assert got == pytest.approx(_brute_aupro(masks, maps, connectivity=8), abs=1e-12)
    assert got != pytest.approx(_brute_aupro(masks, maps, connectivity=4), abs=1e-6)


def test_aupro_hand_values_and_edge_cases():
    masks = _hand_masks()
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0)  # perfect map
    # All-zero maps: one threshold, the curve is the diagonal: area 0.3^2 / 2, / 0.3 = 0.15.
    assert aupro(masks, np.zeros(masks.shape)) == pytest.approx(0.15)
    assert pixel_auroc(masks, np.zeros(masks.shape)) == 0.5
    fpr, pro = pro_curve(masks, np.zeros(masks.shape))
    np.testing.assert_allclose(fpr, [0, 1, 1]) and np.testing.assert_allclose(pro, [0, 1, 1])
    assert aupro(masks, -masks.astype(float)) == pytest.approx(0.0)  # every normal pixel before any defect
    with pytest.raises(ValueError, match="at least one defect region"):
        aupro(np.zeros((2, 4, 4), bool), np.ones((2, 4, 4)))
    with pytest.raises(ValueError, match="both defective and normal pixels"):
        pixel_auroc(np.zeros((2, 4, 4), bool), np.ones((2, 4, 4)))
    with pytest.raises(ValueError, match="same 2-D shape"):
        aupro(masks, np.zeros((3, 5, 6)))
    with pytest.raises(ValueError, match="non-finite"):
        aupro(masks, np.full(masks.shape, np.nan))


def test_trapezoid_interpolates_at_the_limit():
    # y = x on [0, 1]: area to 0.5 is 0.125, whether 0.5 is a point of the curve or not.
    assert trapezoid([0, 1], [0, 1], 0.5) == pytest.approx(0.125)
    assert trapezoid([0, 0.5, 1], [0, 0.5, 1], 0.5) == pytest.approx(0.125)
    assert trapezoid([0, 0.2, 1], [0, 1, 1], 0.6) == pytest.approx(0.1 + 0.4)


def test_pixel_auroc_matches_sklearn():
    masks = _hand_masks()
    maps = np.round(np.random.default_rng(1).normal(size=masks.shape) + masks, 1)
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    # Lists of maps of different sizes are pooled the same way.
    ms, ps = [masks[0], masks[1][:5]], [maps[0], maps[1][:5]]
    pooled_y = np.concatenate([m.ravel() for m in ms])
    pooled_s = np.concatenate([p.ravel() for p in ps])
    assert pixel_auroc(ms, ps) == pytest.approx(roc_auc_score(pooled_y, pooled_s), abs=1e-12)


def test_image_metrics_match_sklearn_including_ties():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 40)
    s = np.round(rng.normal(size=40) + y, 1)
    got = image_metrics(y, s)
    assert got["image_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert got["image_aupr"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    best = max(f1_score(y, s >= t) for t in np.unique(s))
    assert got["image_f1_max"] == pytest.approx(best, abs=1e-12)
    assert f1_score(y, s >= got["image_f1_threshold"]) == pytest.approx(best, abs=1e-12)
    assert got["n_good"] + got["n_defective"] == 40
    assert f1_max([0, 1], [0.0, 0.0]) == (pytest.approx(2 / 3), 0.0)  # a tie: flag both, P = 1/2, R = 1
    with pytest.raises(ValueError, match="good and defective"):
        image_metrics([0, 0], [1.0, 2.0])
    with pytest.raises(ValueError, match="0 \\(good\\) or 1"):
        image_metrics([0, 2], [1.0, 2.0])


def test_anomaly_metrics_combines_both_levels():
    masks = _hand_masks()
    maps = np.random.default_rng(3).normal(size=masks.shape) + 2 * masks
    labels = masks.any(axis=(1, 2)).astype(int)
    scores = maps.max(axis=(1, 2))
    out = anomaly_metrics(labels, scores, masks, maps)
    assert set(out) >= {"image_auroc", "image_aupr", "image_f1_max", "pixel_auroc", "aupro"}
    assert out["aupro"] == pytest.approx(_brute_aupro(masks, maps), abs=1e-12)
    assert "pixel_auroc" not in anomaly_metrics(labels, scores)
    with pytest.raises(ValueError, match="both masks and maps"):
        anomaly_metrics(labels, scores, masks=masks)
