"""NCI — Neural-Collapse-inspired detector: proximity to the predicted class's weight + norm filter.

Liu & Qin, "Detecting Out-of-distribution through the Lens of Neural Collapse", CVPR 2025
(arXiv:2311.01479).

With ``f = argmax logits``, ``mu`` the mean ID penultimate feature and ``w_f`` the last-layer row of
class f: ``pScore = <w_f, z - mu> / ||z - mu||_2`` (the centred feature's projection on the class
weight; ID features align with it under neural collapse), and the L1 norm ``||z||_1`` filters OOD
features that sit near the origin. Score: ``-(pScore + alpha * ||z||_1)`` (the paper's ID score,
negated). The formula follows the authors' official implementation (``NCI-OOD``, identical to the
OpenOOD v1.5 ``nci`` postprocessor), which does not divide by ``||w_f||``.
Defaults: ``alpha=1e-4`` (OpenOOD v1.5 ``nci.yml``; the authors tune alpha per benchmark over
[1e-4, 1e-3, 1e-2, 1e-1] on validation data).
"""

from __future__ import annotations

import torch

from oodscope.detectors import _gaussian as g
from oodscope.detectors._feature_select import FeatureField, check_weight
from oodscope.detectors.base import Detector, DetectorError, register
from oodscope.detectors.kinds import DetectorKind


@register
class NCI(FeatureField, Detector):
    name = "nci"
    kind = DetectorKind.FEATURE
    requires = ("penultimate", "logits", "weight")
    extra_requires = ("logits", "weight")
    feature_choices = ("penultimate", "embedding")
    needs_fit = True

    def __init__(self, alpha: float = 1e-4, feature: str = "penultimate") -> None:
        super().__init__()
        self.alpha = alpha
        self.feature = feature
        self._check_feature(feature)
        if not alpha >= 0:
            raise DetectorError(f"{self.name}: alpha must be >= 0, got {alpha}")

    def _fit(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None) -> None:
        self._record_fields()
        self.state_["mean"] = g.mean(g.check_matrix(inputs["x"], self.name))

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = inputs["x"].to(torch.float64)
        self._check_width(x, self.state_["mean"].shape[0])
        logits, weight = inputs["logits"], inputs["weight"].to(torch.float64)
        check_weight(weight, logits.shape[1], x.shape[1], self.name)
        centred = x - self._state("mean", x)
        w_pred = weight[logits.argmax(dim=1)]
        proximity = (w_pred * centred).sum(dim=1) / centred.norm(dim=1).clamp_min(
            torch.finfo(torch.float64).tiny
        )
        return -(proximity + self.alpha * x.abs().sum(dim=1))
