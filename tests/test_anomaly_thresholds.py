"""Anomaly thresholds from normal images only: the conformal image threshold keeps false alarms on good
parts <= alpha over repeated seeded draws (binomial tolerance), and the test catches two broken
variants (no (n + 1) correction; calibrating on the fit images); the pixel threshold (conformal risk
control) keeps the expected false-positive pixel rate <= its target; a port of anomalib's
F1AdaptiveThreshold flags almost everything when the validation set has no defective image.

Scores and maps come from real texture crops (scikit-image's gravel photograph): a nearest-neighbour
distance to 50 training crops (image score) and the smoothed absolute difference to their mean
(map). Draws are random subsets of a pool of crops, which makes them exchangeable."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage, stats

from oodscope.calibration.anomaly_thresholds import (
    PixelThreshold,
    fit_image_threshold,
    fit_pixel_threshold,
    pixel_losses,
)

ALPHA, N_CAL, TRIALS = 0.1, 10, 4000


def anomalib_f1_adaptive_threshold(scores, labels) -> float:
    """anomalib's F1AdaptiveThreshold.compute (thresholds=None), ported from anomalib
    (src/anomalib/metrics/threshold/f1_adaptive_threshold.py) over torchmetrics' non-binned binary PR
    curve (_binary_clf_curve, then the curves flipped so thresholds ascend): F1 = 2PR / (P + R + 1e-10),
    NaN -> 0, threshold = thresholds[argmax F1]. anomalib's PostProcessor then flags score > threshold."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(np.int64)
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    idx = np.append(np.flatnonzero(np.diff(s_sorted)), s.size - 1)  # last index of each distinct value
    tps = np.cumsum(y_sorted)[idx]
    fps = 1 + idx - tps
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = tps / (tps + fps)
        recall = tps / tps[-1]  # 0 / 0 = NaN when there is no positive
    precision = np.append(precision[::-1], 1.0)
    recall = np.append(recall[::-1], 0.0)
    thresholds = s_sorted[idx][::-1]
    with np.errstate(invalid="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall + 1e-10), nan=0.0)
    return float(thresholds[int(np.argmax(f1))])


@pytest.fixture(scope="module")
def pool():
    data = pytest.importorskip("skimage.data")
    photo = data.gravel().astype(np.float64) / 255.0
    rng = np.random.default_rng(0)

    def crops(n, top):
        ys = rng.integers(top, top + 256 - 32, n)
        xs = rng.integers(0, 512 - 32, n)
        return np.stack([photo[y : y + 32, x : x + 32] for y, x in zip(ys, xs, strict=True)])

    fit, test = crops(50, 0), crops(3000, 256)  # fit crops from the top half, the pool from the bottom

    def feat(c):
        return c.reshape(len(c), 8, 4, 8, 4).mean(axis=(2, 4)).reshape(len(c), -1)

    def knn(queries, bank):
        d = ((feat(queries)[:, None] - feat(bank)[None]) ** 2).sum(-1)
        return np.sqrt(d.min(axis=1))

    mean = fit.mean(axis=0)
    maps = ndimage.gaussian_filter(np.abs(test[:600] - mean), sigma=(0, 2, 2))[:, ::2, ::2]  # (600, 16, 16)
    return {"fit": fit, "crops": test, "scores": knn(test, fit), "maps": maps, "knn": knn}


def _false_alarms(pool, fit_fn, trials=TRIALS, n=N_CAL, seed=1) -> int:
    """Flagged fresh good images, one per trial, each with a new calibration draw (independent Bernoullis)."""
    rng = np.random.default_rng(seed)
    scores = pool["scores"]
    flagged = 0
    for _ in range(trials):
        idx = rng.choice(scores.size, n + 1, replace=False)
        flagged += bool(scores[idx[n]] > fit_fn(scores[idx[:n]]))
    return flagged


def _limit(trials=TRIALS, alpha=ALPHA) -> int:
    # A Binomial(trials, alpha) count exceeds this with probability 1e-4.
    return int(stats.binom.ppf(1 - 1e-4, trials, alpha))


def test_conformal_image_threshold_keeps_false_alarms_below_alpha(pool):
    flagged = _false_alarms(pool, lambda cal: fit_image_threshold(cal, ALPHA).value)
    assert flagged <= _limit()
    # Continuous scores: the rate is exactly (n + 1 - k) / (n + 1) = 1 / 11 here, not far below alpha.
    assert flagged >= int(stats.binom.ppf(1e-4, TRIALS, 1 / 11))


def test_the_check_catches_a_quantile_without_the_n_plus_1_correction(pool):
    def naive(cal):  # the k = ceil(n (1 - alpha))-th score: 9th of 10, false alarms 2 / 11
        return np.sort(cal)[math.ceil(cal.size * (1 - ALPHA)) - 1]

    assert _false_alarms(pool, naive) > _limit()


def test_the_check_catches_calibrating_on_the_fit_images(pool):
    rng = np.random.default_rng(2)
    crops, knn = pool["crops"], pool["knn"]
    flagged = 0
    for _ in range(400):
        idx = rng.choice(len(crops), N_CAL + 1, replace=False)
        bank = crops[idx[:N_CAL]]  # the detector is fitted on the calibration images themselves
        thr = fit_image_threshold(knn(bank, bank), ALPHA)  # their own distances: 0
        flagged += bool(thr.decide(knn(crops[idx[N_CAL:]], bank))[0])
    assert flagged > _limit(400)
    with pytest.raises(ValueError, match="overlap the detector's fit data"):
        fit_image_threshold(np.arange(20.0), ALPHA, fit_ids=[1, 2, 3], cal_ids=[3, 4])


def test_anomalib_f1_threshold_port_and_its_failure_without_defective_images(pool):
    # anomalib's docstring example.
    assert anomalib_f1_adaptive_threshold([2.3, 1.6, 2.6, 7.9, 3.3], [0, 0, 0, 1, 1]) == 3.3
    rng = np.random.default_rng(3)
    scores = pool["scores"]
    n, trials = 30, 500
    theirs = ours = 0
    for _ in range(trials):
        idx = rng.choice(scores.size, n + 1, replace=False)
        val, new = scores[idx[:n]], scores[idx[n]]
        t_f1 = anomalib_f1_adaptive_threshold(val, np.zeros(n))  # F1 = 0 everywhere: the lowest score
        assert t_f1 == val.min()
        theirs += bool(new > t_f1)
        ours += bool(fit_image_threshold(val, ALPHA).decide([new])[0])
    assert theirs / trials > 0.9  # anomalib flags nearly every good part (n / (n + 1) in expectation)
    assert ours <= _limit(trials)  # ours keeps its stated rate


def test_pixel_threshold_by_hand_and_its_errors():
    maps = [np.array([[0.0, 1.0], [2.0, 3.0]]), np.array([[4.0, 5.0], [6.0, 7.0]])]
    # n = 2, target 0.5: sum_i L_i(t) may be at most 0.5 * 3 - 1 = 0.5: t = 5 (L = 0, 0.5); t = 4 gives 0.75.
    thr = fit_pixel_threshold(maps, 0.5)
    assert thr.value == 5.0 and thr.n == 2 and thr.calibration_fpr == pytest.approx(0.25)
    np.testing.assert_array_equal(thr.decide(maps[1]), [[False, False], [True, True]])
    ragged = thr.decide([maps[0], np.array([[9.0, 1.0, 5.5]])])  # maps of different sizes
    assert not ragged[0].any() and ragged[1].tolist() == [[True, False, True]]
    assert pixel_losses(maps, 4.0).tolist() == [0.0, 0.75]
    assert PixelThreshold.from_dict(thr.to_dict()) == thr
    with pytest.raises(ValueError, match="too few for target_fpr"):
        fit_pixel_threshold(maps, 0.2)  # needs n >= 4
    with pytest.raises(ValueError, match="non-finite"):
        fit_pixel_threshold([np.array([[np.nan]])] * 30, 0.5)


def test_pixel_threshold_keeps_the_expected_false_positive_rate(pool):
    maps = pool["maps"]
    target, n, trials = 0.1, 60, 300
    rng = np.random.default_rng(4)
    ours, theirs = [], []
    for _ in range(trials):
        idx = rng.choice(len(maps), n + 1, replace=False)
        cal, new = maps[idx[:n]], maps[idx[n]]
        ours.append(float(fit_pixel_threshold(cal, target).decide(new).mean()))
        t_f1 = anomalib_f1_adaptive_threshold(cal, np.zeros(cal.shape))  # no defective pixel
        theirs.append(float((new > t_f1).mean()))
    ours_mean = float(np.mean(ours))
    assert ours_mean <= target + 3 * np.std(ours) / math.sqrt(trials)
    # Not vacuous: conformal risk control's calibration budget is (target (n + 1) - 1) / n = 0.085 per image.
    assert ours_mean > 0.05
    assert np.mean(theirs) > 0.95  # the F1 threshold without defects flags nearly every good pixel
