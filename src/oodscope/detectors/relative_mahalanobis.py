"""Relative Mahalanobis distance (RMD).

Ren, Fort, Liu, Roy, Padhy & Lakshminarayanan, "A Simple Fix to Mahalanobis Distance for
Improving Near-OOD Detection", arXiv:2106.09022 (ICML 2021 UDL workshop).

Score: ``min_c (MD_c(x) - MD_0(x))`` where ``MD_c`` is the squared Mahalanobis distance to class
``c`` under the tied within-class covariance (as in ``mahalanobis``) and ``MD_0`` the squared
distance under a single "background" Gaussian fitted to all ID features regardless of class. The
paper's confidence is ``-min_c RMD_c``; this is its negative. Both covariances are maximum
likelihood estimates.
Defaults: ``feature="auto"`` and ``rcond`` as in ``mahalanobis``; ``shrinkage=None``, the rule of
``mahalanobis`` applied to each covariance on its own (``n`` fit images, width ``d``, ``C`` classes):
the tied covariance keeps the paper's plain estimate (shrinkage 0, OpenOOD v1.5 ``rmds``) while
``n - C >= d`` and the background one while ``n - 1 >= d``; a covariance that would be singular gets
the Ledoit-Wolf shrinkage intensity (Ledoit & Wolf, J. Multivariate Analysis 2004) of its
deviations (``x_i - mu_(y_i)``, resp. ``x_i - mean``). The chosen values are recorded in
``fit_info_["auto"]`` as ``"shrinkage"`` (tied) and ``"background_shrinkage"``; a singular tied fit
still records a caution (``FitWarning``). An explicit ``shrinkage`` always wins and applies to both
covariances (``0.0``: the plain pseudo-inverses, with the caution).
"""

from __future__ import annotations

import torch

from oodscope.detectors import _fit_size
from oodscope.detectors import _gaussian as g
from oodscope.detectors._feature_select import FeatureField
from oodscope.detectors.base import Detector, register
from oodscope.detectors.kinds import DetectorKind
from oodscope.detectors.mahalanobis import check_shrinkage


@register
class RelativeMahalanobis(FeatureField, Detector):
    name = "relative_mahalanobis"
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
        x = g.check_matrix(inputs["x"], self.name)
        model = g.fit_tied_classes(x, labels, self.shrinkage, self.rcond)
        background_mean = g.mean(x)
        background_cov = g.covariance(x, background_mean)
        auto = self.shrinkage is None
        if auto:
            background_shrinkage = g.auto_shrinkage(x, background_cov, background_mean)
            _fit_size.record(self, "shrinkage", model.shrinkage)
            _fit_size.record(self, "background_shrinkage", background_shrinkage)
        else:
            background_shrinkage = self.shrinkage
        background_cov = g.shrink(background_cov, background_shrinkage)
        self.state_["means"] = model.means
        self.state_["class_ids"] = model.class_ids
        self.state_["whitener"] = model.whitener
        self.state_["background_mean"] = background_mean[None, :]
        self.state_["background_whitener"] = g.whitener(background_cov, self.rcond)
        caution = g.few_samples_caution(*x.shape, model.shrinkage, len(model.means), auto=auto)
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
