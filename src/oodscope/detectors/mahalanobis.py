"""Mahalanobis — minimum class-conditional Mahalanobis distance with a shared covariance.

Lee, Lee, Lee & Shin, "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
Adversarial Attacks", NeurIPS 2018.

Score: ``min_c (x - mu_c)^T Sigma^+ (x - mu_c)`` (squared distance; the paper's confidence is its
negative), with class means ``mu_c`` and the tied within-class covariance ``Sigma`` (maximum
likelihood, divided by N) of labelled ID features.
Defaults: ``shrinkage=0`` and no input pre-processing, as OpenOOD v1.5 ``mds`` (``mds.yml``);
the paper's input perturbation (ODIN-style, needs gradients) is not part of this post-hoc detector.
``feature="auto"`` reads ``penultimate`` when the backbone has it, else ``embedding`` (so it also
works on vision-language image embeddings). ``rcond`` is the relative eigenvalue cut-off of the
pseudo-inverse (None: ``D * eps``, sklearn/scipy's default).
"""

from __future__ import annotations

import torch

from oodscope.detectors import _gaussian as g
from oodscope.detectors._feature_select import FeatureField
from oodscope.detectors.base import Detector, DetectorError, register
from oodscope.detectors.kinds import DetectorKind


@register
class Mahalanobis(FeatureField, Detector):
    name = "mahalanobis"
    kind = DetectorKind.FEATURE
    requires = ("embedding",)
    needs_fit = True
    needs_labels = True

    def __init__(self, feature: str = "auto", shrinkage: float = 0.0, rcond: float | None = None) -> None:
        super().__init__()
        self.feature = feature
        self.shrinkage = shrinkage
        self.rcond = rcond
        self._check_feature(feature)
        if not 0.0 <= shrinkage <= 1.0:
            raise DetectorError(f"{self.name}: shrinkage must be in [0, 1], got {shrinkage}")

    def _fit(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None) -> None:
        self._record_fields()
        model = g.fit_tied_classes(g.check_matrix(inputs["x"], self.name), labels, self.shrinkage, self.rcond)
        self.state_["means"] = model.means
        self.state_["class_ids"] = model.class_ids
        self.state_["whitener"] = model.whitener
        self.fit_info_["rank"] = int(model.whitener.shape[1])
        caution = g.few_samples_caution(*inputs["x"].shape, self.shrinkage, len(model.means))
        if caution:
            self._caution(caution)

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = inputs["x"].to(torch.float64)
        self._check_width(x, self.state_["means"].shape[1])
        return g.squared_mahalanobis(x, self._state("means", x), self._state("whitener", x)).amin(dim=1)
