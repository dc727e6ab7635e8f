"""Relative Mahalanobis distance (RMD).

Ren, Fort, Liu, Roy, Padhy & Lakshminarayanan, "A Simple Fix to Mahalanobis Distance for
Improving Near-OOD Detection", arXiv:2106.09022 (ICML 2021 UDL workshop).

Score: ``min_c (MD_c(x) - MD_0(x))`` where ``MD_c`` is the squared Mahalanobis distance to class
``c`` under the tied within-class covariance (as in ``mahalanobis``) and ``MD_0`` the squared
distance under a single "background" Gaussian fitted to all ID features regardless of class. The
paper's confidence is ``-min_c RMD_c``; this is its negative. Both covariances are maximum
likelihood estimates.
Defaults: ``shrinkage=0`` (paper; OpenOOD v1.5 ``rmds``); ``feature="auto"`` and ``rcond`` as in
``mahalanobis``. Shrinkage, when set, applies to both covariances.
"""

from __future__ import annotations

import torch

from oodscope.detectors import _gaussian as g
from oodscope.detectors._feature_select import FeatureField
from oodscope.detectors.base import Detector, DetectorError, register
from oodscope.detectors.kinds import DetectorKind


@register
class RelativeMahalanobis(FeatureField, Detector):
    name = "relative_mahalanobis"
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
        x = g.check_matrix(inputs["x"], self.name)
        model = g.fit_tied_classes(x, labels, self.shrinkage, self.rcond)
        background_mean = g.mean(x)
        background_cov = g.shrink(g.covariance(x, background_mean), self.shrinkage)
        self.state_["means"] = model.means
        self.state_["class_ids"] = model.class_ids
        self.state_["whitener"] = model.whitener
        self.state_["background_mean"] = background_mean[None, :]
        self.state_["background_whitener"] = g.whitener(background_cov, self.rcond)
        caution = g.few_samples_caution(*x.shape, self.shrinkage, len(model.means))
        if caution:
            self._caution(caution)

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = inputs["x"].to(torch.float64)
        self._check_width(x, self.state_["means"].shape[1])
        md_c = g.squared_mahalanobis(x, self._state("means", x), self._state("whitener", x))
        md_0 = g.squared_mahalanobis(
            x, self._state("background_mean", x), self._state("background_whitener", x)
        )
        return (md_c - md_0).amin(dim=1)
