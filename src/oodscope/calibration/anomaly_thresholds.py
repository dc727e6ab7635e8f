"""Anomaly thresholds with a guarantee from normal images alone (no defective validation image needed).

* Image threshold: the split-conformal threshold of :func:`~oodscope.calibration.threshold.fit_threshold`
  at ID acceptance ``1 - alpha`` on the scores of held-out good images: a new good image is flagged
  (``score > value``) with probability ``<= alpha`` (over the calibration draw and the image);
  ``check_disjoint`` refuses calibration images the detector was fitted on.
* Pixel threshold: conformal risk control (Angelopoulos, Bates, Fisch, Lei & Schuster, "Conformal Risk
  Control", ICLR 2024, Theorem 1) with the loss ``L_i(t)`` = fraction of the pixels of good image i
  whose map value is ``> t`` (non-increasing and right-continuous in t, bounded by B = 1):

      t = min{ t : (sum_i L_i(t) + 1) / (n + 1) <= target_fpr }

  gives ``E[L_new(t)] <= target_fpr``: the expected false-positive pixel rate on a new good image is
  at most the target. Images, not pixels, are the exchangeable units, so neighbouring pixels may be
  as correlated as they like. Needs ``n >= 1 / target_fpr - 1`` good images.

By contrast, an F1-maximising threshold (anomalib's ``F1AdaptiveThreshold``) needs defective
validation images; without them its F1 is 0 at every threshold and it returns the lowest validation
score, flagging nearly everything (``tests/test_anomaly_thresholds.py`` shows both).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from oodscope.calibration import check_disjoint
from oodscope.calibration.threshold import Threshold, fit_threshold

__all__ = ["PixelThreshold", "fit_image_threshold", "fit_pixel_threshold", "pixel_losses"]


def fit_image_threshold(normal_scores: Any, alpha: float = 0.05, *, fit_ids: Any = None,
                        cal_ids: Any = None) -> Threshold:
    """The conformal image threshold: false alarms on good parts ``<= alpha`` (``decide`` flags ``> value``).

    ``normal_scores``: image scores of good images the detector was *not* fitted on (``fit_ids`` /
    ``cal_ids`` given: checked disjoint). Needs ``n >= (1 - alpha) / alpha`` images (19 for 0.05).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if fit_ids is not None and cal_ids is not None:
        check_disjoint(fit_ids, cal_ids)
    # 1 - alpha as the decimal the user typed (1 - 0.1 = 0.9, not 0.9000000000000000222).
    return fit_threshold(normal_scores, float(1 - Fraction(repr(float(alpha)))))


def _as_maps(normal_maps: Any) -> list[np.ndarray]:
    maps = list(normal_maps) if not (isinstance(normal_maps, np.ndarray) and normal_maps.ndim == 2) else [normal_maps]
    out = []
    for i, m in enumerate(maps):
        a = np.asarray(m, dtype=np.float64)
        if a.ndim != 2 or a.size == 0:
            raise ValueError(f"map {i} must be a non-empty 2-D array, got shape {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError(f"map {i} has {int((~np.isfinite(a)).sum())} non-finite value(s)")
        out.append(a)
    if not out:
        raise ValueError("no maps given")
    return out


def pixel_losses(maps: Any, t: float) -> np.ndarray:
    """``L_i(t)``: the fraction of each map's pixels above ``t`` (its false-positive rate on a good image)."""
    return np.asarray([float(np.mean(m > t)) for m in _as_maps(maps)])


@dataclass
class PixelThreshold:
    """A pixel threshold: a pixel is flagged when its map value is ``> value``.

    ``target_fpr``: the bound on the expected false-positive pixel rate of a new good image;
    ``n``: good calibration images; ``calibration_fpr``: the mean pixel FPR of the calibration maps
    at ``value``; ``method``: ``"conformal-risk-control"``.
    """

    value: float
    target_fpr: float
    n: int
    calibration_fpr: float
    method: str = "conformal-risk-control"

    def decide(self, maps: Any) -> np.ndarray | list[np.ndarray]:
        """Boolean maps, True = flagged defective (``map value > value``); a list of maps gives a list."""
        if isinstance(maps, (list, tuple)):
            return [self.decide(m) for m in maps]
        a = np.asarray(maps, dtype=np.float64)
        if np.isnan(a).any():
            raise ValueError(f"maps contain {int(np.isnan(a).sum())} NaN value(s)")
        return a > self.value

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PixelThreshold:
        return cls(**d)


def fit_pixel_threshold(normal_maps: Any, target_fpr: float = 0.01) -> PixelThreshold:
    """The pixel threshold at a target false-positive rate on good images' pixels (conformal risk control).

    ``normal_maps``: anomaly maps of held-out good images ((N, H, W) or a list of 2-D maps of any sizes).
    """
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in (0, 1), got {target_fpr}")
    maps = _as_maps(normal_maps)
    n = len(maps)
    budget = Fraction(repr(float(target_fpr))) * (n + 1) - 1  # sum_i L_i(t) may be at most this
    if budget < 0:
        raise ValueError(f"{n} good image(s) are too few for target_fpr={target_fpr:g}: conformal risk control "
                         f"needs n >= 1 / target_fpr - 1 = {math.ceil(1 / target_fpr - 1)}")
    # Every pixel carries the weight 1 / (its image's pixel count); sum_i L_i(t) is the weight above t.
    values = np.concatenate([m.ravel() for m in maps])
    weights = np.concatenate([np.full(m.size, 1.0 / m.size) for m in maps])
    uniq, inverse = np.unique(values, return_inverse=True)
    per_value = np.bincount(inverse, weights=weights, minlength=uniq.size)
    above = np.concatenate([np.cumsum(per_value[::-1])[::-1][1:], [0.0]])  # weight strictly above uniq[k]
    # The smallest distinct value whose weight above fits the budget (a tiny slack for float sums).
    k = int(np.flatnonzero(above <= float(budget) + 1e-12)[0])
    value = float(uniq[k])
    return PixelThreshold(value=value, target_fpr=float(target_fpr), n=n,
                          calibration_fpr=float(pixel_losses(maps, value).mean()))
