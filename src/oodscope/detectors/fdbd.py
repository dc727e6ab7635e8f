"""fDBD — feature distance to the decision boundaries, regularised by the distance to the ID mean.

Liu & Qin, "Fast Decision Boundary based Out-of-Distribution Detector", ICML 2024.

With ``f = argmax logits``, the distance from the penultimate feature ``z`` to the boundary between
f and another class c is bounded below by ``|l_f - l_c| / ||w_f - w_c||`` (logits l, last-layer rows
w). Score: ``-(1 / (C - 1)) * sum_{c != f} |l_f - l_c| / ||w_f - w_c|| / ||z - mu||``, with ``mu`` the
mean ID feature (the paper's fDBD, negated so that higher = more OOD). The authors' code sums
instead of averaging over the C - 1 classes — a constant factor that does not change rankings.
Defaults: the paper's regulariser ``||z - mu||`` (OpenOOD v1.5 ``fdbd.yml``:
``distance_as_normalizer: True``); ``normalizer="norm"`` uses ``||z||`` instead, the alternative
OpenOOD sweeps. No other hyper-parameter.
"""

from __future__ import annotations

import torch

from oodscope.detectors import _gaussian as g
from oodscope.detectors._feature_select import FeatureField, check_weight
from oodscope.detectors.base import Detector, DetectorError, register
from oodscope.detectors.kinds import DetectorKind

NORMALIZERS = ("mean_distance", "norm")


def boundary_distances(logits: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(N,) mean over c != f of ``|l_f - l_c| / ||w_f - w_c||``, in float64."""
    logits = logits.to(torch.float64)
    weight = weight.to(device=logits.device, dtype=torch.float64)
    top, pred = logits.max(dim=1)
    # Row norms ||w_f - w_c|| only for the predicted classes present in this chunk.
    classes, inverse = torch.unique(pred, return_inverse=True)
    w_sq = (weight * weight).sum(dim=1)
    gaps = (w_sq[classes][:, None] + w_sq[None, :] - 2.0 * weight[classes] @ weight.T).clamp_min(0.0).sqrt()
    gaps = gaps[inverse]  # (N, C)
    others = torch.ones_like(gaps, dtype=torch.bool)
    others[torch.arange(len(pred), device=pred.device), pred] = False
    ratio = (top[:, None] - logits).abs() / gaps.clamp_min(torch.finfo(torch.float64).tiny)
    return torch.where(others, ratio, torch.zeros_like(ratio)).sum(dim=1) / max(1, logits.shape[1] - 1)


@register
class FDBD(FeatureField, Detector):
    name = "fdbd"
    kind = DetectorKind.FEATURE
    requires = ("penultimate", "logits", "weight")
    extra_requires = ("logits", "weight")
    feature_choices = ("penultimate", "embedding")
    needs_fit = True

    def __init__(self, normalizer: str = "mean_distance", feature: str = "penultimate") -> None:
        super().__init__()
        self.normalizer = normalizer
        self.feature = feature
        self._check_feature(feature)
        if normalizer not in NORMALIZERS:
            raise DetectorError(
                f"{self.name}: normalizer must be one of {list(NORMALIZERS)}, got {normalizer!r}"
            )

    def _fit(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None) -> None:
        self._record_fields()
        self.state_["mean"] = g.mean(g.check_matrix(inputs["x"], self.name))

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = inputs["x"].to(torch.float64)
        self._check_width(x, self.state_["mean"].shape[0])
        logits, weight = inputs["logits"], inputs["weight"]
        if logits.ndim != 2 or logits.shape[1] < 2:
            raise DetectorError(f"{self.name}: needs (N, C) logits with C >= 2, got {tuple(logits.shape)}")
        check_weight(weight, logits.shape[1], x.shape[1], self.name)
        centre = self._state("mean", x) if self.normalizer == "mean_distance" else torch.zeros_like(x[0])
        scale = (x - centre).norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
        return -boundary_distances(logits, weight) / scale
