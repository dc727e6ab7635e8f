"""Gaussian AD — a multivariate Gaussian per feature level of spatially pooled deep features.

Rippel, Mertens & Merhof, "Modeling the Distribution of Normal Data in Pre-Trained Deep Features for
Anomaly Detection", ICPR 2020 (arXiv:2005.14140).

Formula: ``s(x) = sum_l sqrt((f_l(x) - mu_l)^T Sigma_l^-1 (f_l(x) - mu_l))``, ``f_l`` the level-``l``
feature map averaged over its spatial positions, ``(mu_l, Sigma_l)`` the mean and the Ledoit-Wolf
shrunk covariance of ``f_l`` over the normal images.

- Levels (Section 3): the paper uses all nine levels of an ImageNet EfficientNet-B4, each averaged
  spatially; ``layers=None`` uses every dense layer the backbone exposes.
- Covariance (Section 3.2): maximum-likelihood covariance shrunk by the Ledoit-Wolf intensity
  (Ledoit & Wolf, J. Multivariate Analysis 2004; the official code fits
  ``sklearn.covariance.LedoitWolf`` on each level): ``shrinkage=None``. A number in [0, 1] fixes the
  intensity instead (0: the plain ML estimate, pseudo-inverted).
- Distance: the Mahalanobis distance (square root of the quadratic form, as the official
  ``mahalanobis_distance``), summed over levels unweighted.

Image level only. The method has no localisation: its map (``score_maps``) is a single cell per
image, shape (N, 1, 1), holding the image score — the honest "map" of a method that looks at the
pooled image; ``pixel_maps = False`` says so, and pixel metrics should not be computed from it
(an upsampled 1 x 1 map is constant over the image).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from oodscope.detectors import _gaussian as g
from oodscope.detectors._anomaly import AnomalyDetector, dense_inputs
from oodscope.detectors.base import DetectorError, register
from oodscope.detectors.mahalanobis import check_shrinkage


def pooled_levels(dense: dict[str, torch.Tensor], who: str) -> dict[str, torch.Tensor]:
    """(N, C, h, w) maps -> (N, C) spatial means."""
    out = {}
    for name, m in dense.items():
        if m.ndim != 4:
            raise DetectorError(f"{who}: dense layer {name!r} must be (N, C, h, w), got {tuple(m.shape)}")
        out[name] = m.to(torch.float64).mean(dim=(2, 3))
    return out


@register
class GaussianAD(AnomalyDetector):
    name = "gaussian_ad"
    #: The map is one cell per image (the image score), not a localisation.
    pixel_maps: ClassVar[bool] = False

    def __init__(self, layers: list[str] | None = None, shrinkage: float | None = None, rcond: float | None = None):
        super().__init__()
        self.layers = layers
        self.shrinkage = shrinkage
        self.rcond = rcond
        if layers is not None and (not layers or len(set(layers)) != len(layers)):
            raise DetectorError(f"{self.name}: layers must be a non-empty list of distinct names or None")
        check_shrinkage(shrinkage, self.name)

    def _fit(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None) -> None:
        layers = list(self.layers) if self.layers is not None else sorted(inputs["dense"])
        if not layers:
            raise DetectorError(f"{self.name}: the features have no dense maps (ask the backbone for dense_layers)")
        pooled = pooled_levels(dense_inputs(inputs, layers, self.name), self.name)
        chosen = {}
        for i, name in enumerate(layers):
            x = g.check_matrix(pooled[name], self.name, f"level {name!r}")
            mu = g.mean(x)
            cov = g.covariance(x, mu)
            s = self.shrinkage
            if s is None:  # Ledoit-Wolf, always (the paper), not only when the covariance is singular
                s = g.ledoit_wolf_shrinkage(cov, g._fourth_moment(x, mu, None), len(x))
            chosen[name] = float(s)
            self.state_[f"mean.{i}"] = mu
            self.state_[f"whitener.{i}"] = g.whitener(g.shrink(cov, float(s)), self.rcond)
        self.fit_info_.update(layers=layers, shrinkage=chosen)

    def _score_maps(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        layers = self.fit_info_["layers"]
        pooled = pooled_levels(dense_inputs(inputs, layers, self.name), self.name)
        total = None
        for i, name in enumerate(layers):
            x, mu = pooled[name], self.state_[f"mean.{i}"].to(device=pooled[name].device, dtype=torch.float64)
            if x.shape[1] != mu.shape[0]:
                raise DetectorError(f"{self.name}: level {name!r} was {mu.shape[0]}-d at fit, got {x.shape[1]}-d")
            d = g.squared_mahalanobis(x, mu[None], self._state(f"whitener.{i}", x))[:, 0].sqrt()
            total = d if total is None else total + d
        return total, total.float()[:, None, None]
