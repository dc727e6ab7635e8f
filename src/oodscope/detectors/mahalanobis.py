"""Mahalanobis — minimum class-conditional Mahalanobis distance with a shared covariance.

Lee, Lee, Lee & Shin, "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
Adversarial Attacks", NeurIPS 2018.

Score: ``min_c (x - mu_c)^T Sigma^+ (x - mu_c)`` (squared distance; the paper's confidence is its
negative), with class means ``mu_c`` and the tied within-class covariance ``Sigma`` (maximum
likelihood, divided by N) of labelled ID features.
Defaults: no input pre-processing, as OpenOOD v1.5 ``mds`` (``mds.yml``; the paper's input
perturbation, ODIN-style, needs gradients and is not part of this post-hoc detector), and
``shrinkage=None``, a rule of the number of fit images ``n``, the feature width ``d`` and the number
of classes ``C``: the plain estimate of the paper and OpenOOD (shrinkage 0) whenever the tied
covariance can be full rank, ``n - C >= d``; otherwise (it is then singular, and the pseudo-inverse
ignores every direction the fit images do not span) the Ledoit-Wolf shrinkage intensity (Ledoit &
Wolf, J. Multivariate Analysis 2004; ``sklearn.covariance.ledoit_wolf_shrinkage``) of the
within-class deviations ``x_i - mu_(y_i)``, towards ``trace(Sigma) / d * I``. So 1,280-d features
with 6 classes are not shrunk from n = 1,286 on (the 6,000-image leaderboard: 0), and 100 images of
them are. The chosen value is recorded in ``fit_info_["auto"]["shrinkage"]``
(:mod:`oodscope.detectors._fit_size`); a singular fit still records a caution (``FitWarning``) that
names it. An explicit ``shrinkage`` always wins (``0.0``: the plain pseudo-inverse, with its caution).
``feature="auto"`` reads ``penultimate`` when the backbone has it, else ``embedding`` (so it also
works on vision-language image embeddings). ``rcond`` is the relative eigenvalue cut-off of the
pseudo-inverse (None: ``D * eps``, sklearn/scipy's default).
"""

from __future__ import annotations

import torch

from oodscope.detectors import _fit_size
from oodscope.detectors import _gaussian as g
from oodscope.detectors._feature_select import FeatureField
from oodscope.detectors.base import Detector, DetectorError, register
from oodscope.detectors.kinds import DetectorKind


def check_shrinkage(shrinkage: float | None, who: str) -> None:
    """``shrinkage`` is None (the fit-size rule) or a number in [0, 1]."""
    if shrinkage is not None and not 0.0 <= shrinkage <= 1.0:
        raise DetectorError(f"{who}: shrinkage must be in [0, 1] or None (automatic), got {shrinkage}")


@register
class Mahalanobis(FeatureField, Detector):
    name = "mahalanobis"
    kind = DetectorKind.FEATURE
    requires = ("embedding",)
    needs_fit = True
    needs_labels = True

    def __init__(self, feature: str = "auto", shrinkage: float | None = None, rcond: float | None = None) -> None:
        super().__init__()
        self.feature = feature
        self.shrinkage = shrinkage
        self.rcond = rcond
        self._check_feature(feature)
        check_shrinkage(shrinkage, self.name)

    def _fit(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None) -> None:
        self._record_fields()
        model = g.fit_tied_classes(g.check_matrix(inputs["x"], self.name), labels, self.shrinkage, self.rcond)
        self.state_["means"] = model.means
        self.state_["class_ids"] = model.class_ids
        self.state_["whitener"] = model.whitener
        self.fit_info_["rank"] = int(model.whitener.shape[1])
        auto = self.shrinkage is None
        if auto:
            _fit_size.record(self, "shrinkage", model.shrinkage)
        caution = g.few_samples_caution(*inputs["x"].shape, model.shrinkage, len(model.means), auto=auto)
        if caution:
            self._caution(caution)

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = inputs["x"].to(torch.float64)
        self._check_width(x, self.state_["means"].shape[1])
        return g.squared_mahalanobis(x, self._state("means", x), self._state("whitener", x)).amin(dim=1)
