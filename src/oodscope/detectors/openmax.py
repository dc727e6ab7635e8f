"""OpenMax — extreme-value re-calibration of the logits with an "unknown" class.

Bendale & Boult, "Towards Open Set Deep Networks", CVPR 2016; reference implementations: the
authors' ``abhijitbendale/OSDN`` (``compute_openmax.py``, libMR) and pytorch-ood's ``OpenMax``
(``detector/openmax/numpy.py`` with ``libnotmr.py``, libMR's Weibull fit redone with scipy).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from scipy.optimize import brentq

from oodscope.detectors import _gaussian as g
from oodscope.detectors._shaping import check_logits
from oodscope.detectors.base import Detector, DetectorError, register
from oodscope.detectors.kinds import DetectorKind

#: libMR's ``FitHigh`` shifts the tail so that its smallest value sits at this constant
#: (kept by pytorch-ood's ``LibNotMR`` "for authenticity"); it only changes the numbers slightly.
TRANSLATION = 10000.0


class Weibull(NamedTuple):
    """A two-parameter Weibull (location 0) fitted to a shifted tail; see :func:`fit_weibull_tail`."""

    shape: float
    scale: float
    shift: float  # the tail's smallest value, subtracted before TRANSLATION is added


def weibull_mle(x: np.ndarray) -> tuple[float, float]:
    """Maximum-likelihood shape ``k`` and scale ``lambda`` of a Weibull with location 0.

    The shape solves ``sum x^k ln x / sum x^k - 1/k - mean(ln x) = 0`` (increasing in k, one root
    when the values are not all equal); the scale is then ``mean(x^k)^(1/k)``. Both are computed on
    ``x / max(x)`` — the equation is scale-free — so ``x^k`` cannot overflow when a shifted tail
    near 10,000 gives shapes in the tens of thousands.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1 or len(x) < 2 or not np.all(x > 0):
        raise DetectorError("a Weibull fit needs at least 2 positive values")
    top = float(x.max())
    log_y = np.log(x / top)
    mean_log = float(log_y.mean())
    if not mean_log < 0:
        raise DetectorError("a Weibull fit needs at least 2 distinct values")

    def equation(k: float) -> float:
        w = np.exp(k * log_y)  # (x / max)^k in (0, 1]: the maximum has weight 1
        return float((w * log_y).sum() / w.sum()) - 1.0 / k - mean_log

    low, high = 1e-6, 1.0
    while equation(high) < 0:  # the equation tends to -mean_log > 0 as k grows
        low, high = high, high * 2.0
    shape = brentq(equation, low, high, xtol=1e-12, rtol=4 * np.finfo(float).eps, maxiter=1000)
    return float(shape), top * float(np.mean(np.exp(shape * log_y))) ** (1.0 / shape)


def fit_weibull_tail(distances: np.ndarray, tailsize: int) -> Weibull:
    """libMR's ``FitHigh``: a Weibull on the ``tailsize`` largest distances, shifted to start at TRANSLATION."""
    tail = np.sort(np.asarray(distances, dtype=np.float64))[-tailsize:]
    shift = float(tail.min())
    shape, scale = weibull_mle(tail + TRANSLATION - shift)
    return Weibull(shape, scale, shift)


def weibull_cdf(d: torch.Tensor, shape: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """libMR's ``W_score``: the fitted CDF at the shifted distance, ``1 - exp(-((d + T - shift) / scale)^shape)``."""
    x = (d + TRANSLATION - shift).clamp_min(0.0)
    return -torch.expm1(-((x / scale) ** shape))


@register
class OpenMax(Detector):
    """OpenMax (Bendale & Boult, CVPR 2016): the probability of the "unknown" class after Weibull re-calibration.

    Score: ``softmax([v_0, v_1 (1 - w_1 a_1), ..., v_C (1 - w_C a_C)])_0`` with ``v_0 = sum_c v_c w_c a_c``,
    ``v`` the logits (the activation vector), ``w_c`` the Weibull CDF of ``||v - mu_c||`` and
    ``a_c = (alpha - r_c + 1) / alpha`` for the ``alpha`` top-ranked classes (rank r_c = 1, 2, ...), 0 otherwise.
    Fit: per class, the mean activation vector ``mu_c`` of its ID images (only those the network
    classifies correctly, ``correct_only``, as the paper; a class with none falls back to all of
    its images), and a Weibull fitted (maximum likelihood, location 0, after libMR's shift of the
    tail to 10,000) to the ``tailsize`` largest distances of those images to ``mu_c``. A class
    without a model (no images, or fewer than 2 distinct tail distances) gets ``w_c = 1``, as
    pytorch-ood does for a class it never fitted; both are listed in ``fit_info_``.
    Defaults: ``tailsize=20`` (the OSDN code's ``WEIBULL_TAIL_SIZE`` and libMR/``LibNotMR``'s
    default; pytorch-ood's ``OpenMax`` passes 25), ``alpha=10`` (OSDN ``ALPHA_RANK``, pytorch-ood;
    at most C), ``euclid_weight=1.0`` — Euclidean distance, pytorch-ood's default (OSDN's "eucos" is
    ``euclidean / 200 + cosine``; ``euclid_weight=w`` gives ``w * euclidean + (1 - w) * cosine``).
    """

    name = "openmax"
    kind = DetectorKind.FEATURE
    requires = ("logits",)
    needs_fit = True
    needs_labels = True

    def __init__(
        self, tailsize: int = 20, alpha: int = 10, euclid_weight: float = 1.0, correct_only: bool = True
    ) -> None:
        super().__init__()
        if not (isinstance(tailsize, int) and tailsize >= 2):
            raise DetectorError(f"{self.name}: tailsize must be an integer >= 2, got {tailsize!r}")
        if not (isinstance(alpha, int) and alpha >= 1):
            raise DetectorError(f"{self.name}: alpha must be a positive integer, got {alpha!r}")
        if not 0.0 <= euclid_weight <= 1.0:
            raise DetectorError(f"{self.name}: euclid_weight must be in [0, 1], got {euclid_weight}")
        self.tailsize = tailsize
        self.alpha = alpha
        self.euclid_weight = float(euclid_weight)
        self.correct_only = correct_only

    def distances(self, v: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
        """(N, C) distance of each activation vector to each class's mean activation vector."""
        v, means = v.to(torch.float64), means.to(device=v.device, dtype=torch.float64)
        out = torch.zeros(len(v), len(means), dtype=torch.float64, device=v.device)
        if self.euclid_weight > 0:
            out += self.euclid_weight * torch.cdist(v, means)
        if self.euclid_weight < 1:
            tiny = torch.finfo(torch.float64).tiny
            cosine = (v @ means.T) / (v.norm(dim=1, keepdim=True) * means.norm(dim=1)[None, :]).clamp_min(tiny)
            out += (1.0 - self.euclid_weight) * (1.0 - cosine)
        return out

    def _fit(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None) -> None:
        v = check_logits(g.check_matrix(inputs["logits"], self.name, "logits"), self.name).to(torch.float64)
        n_classes = v.shape[1]
        if int(labels.min()) < 0 or int(labels.max()) >= n_classes:
            raise DetectorError(f"{self.name}: labels must be in [0, {n_classes}) to match the logits")
        correct = v.argmax(dim=1) == labels
        means = torch.zeros(n_classes, n_classes, dtype=torch.float64, device=v.device)
        params = np.zeros((n_classes, 3))
        has_model = np.zeros(n_classes, dtype=np.uint8)
        fallback, without = [], []
        for c in range(n_classes):
            rows = labels == c
            if self.correct_only and bool((rows & correct).any()):
                rows = rows & correct
            elif self.correct_only and bool(rows.any()):
                fallback.append(c)
            if not bool(rows.any()):
                without.append(c)
                continue
            means[c] = v[rows].mean(dim=0)
            d = self.distances(v[rows], means[c : c + 1])[:, 0].cpu().numpy()
            try:
                params[c] = fit_weibull_tail(d, self.tailsize)
            except DetectorError:  # one image, or identical distances: no tail to fit
                without.append(c)
                continue
            has_model[c] = 1
        if not has_model.any():
            raise DetectorError(f"{self.name}: no class has at least 2 distinct ID distances to fit a Weibull tail")
        self.state_["means"] = means
        self.state_["weibull"] = torch.from_numpy(params)  # (C, 3): shape, scale, shift
        self.state_["has_model"] = torch.from_numpy(has_model)
        self.fit_info_["classes_without_correct_samples"] = fallback
        self.fit_info_["classes_without_model"] = without

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        v = check_logits(inputs["logits"], self.name).to(torch.float64)
        means = self._state("means", v)
        n_classes = len(means)
        if v.shape[1] != n_classes:
            raise DetectorError(f"{self.name}: fitted with {n_classes} classes, logits have {v.shape[1]}")
        weibull = self._state("weibull", v)
        has_model = self.state_["has_model"].to(v.device).bool()
        w = weibull_cdf(self.distances(v, means), weibull[:, 0], weibull[:, 1], weibull[:, 2])
        w = torch.where(has_model[None, :], w, torch.ones_like(w))
        alpha = min(self.alpha, n_classes)
        top = torch.topk(v, alpha, dim=1).indices  # descending: rank 1 first
        ranks = torch.arange(alpha, 0, -1, dtype=torch.float64, device=v.device) / alpha  # 1, (a-1)/a, ..., 1/a
        ranked_alpha = torch.zeros_like(v).scatter_(1, top, ranks.expand(len(v), -1))
        revised_weight = w * ranked_alpha
        unknown = (v * revised_weight).sum(dim=1, keepdim=True)
        revised = torch.cat([unknown, v * (1.0 - revised_weight)], dim=1)
        return torch.softmax(revised, dim=1)[:, 0]
