"""ReAct — rectified (clipped) penultimate activations, then the energy.

Sun, Guo & Li, "ReAct: Out-of-distribution Detection With Rectified Activations", NeurIPS 2021.

Fit: ``c`` = the ``percentile``-th percentile of all penultimate activations of the ID data
(every unit of every image pooled together, as in the authors' ``compute_threshold.py``).
Score: ``-logsumexp(min(h, c) @ W.T + b)`` (energy of the recomputed logits; higher = more OOD).
Defaults: ``percentile=90`` (paper and authors' ``compute_threshold.py``; OpenOOD v1.5 ``react.yml``).
"""

from __future__ import annotations

import torch

from oodscope.detectors._shaping import check_percentile, energy_score, linear_head, percentile
from oodscope.detectors.base import Detector, DetectorError, register
from oodscope.detectors.kinds import DetectorKind


@register
class ReAct(Detector):
    name = "react"
    kind = DetectorKind.OUTPUT
    requires = ("penultimate", "weight", "bias")
    needs_fit = True

    def __init__(self, percentile: float = 90.0) -> None:
        super().__init__()
        self.percentile = check_percentile(percentile, self.name, allow_100=True)

    def _fit(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None) -> None:
        h = inputs["penultimate"]
        if len(h) == 0:
            raise DetectorError(f"{self.name}: fit needs at least one in-distribution image")
        # Checks the shapes of h, W and b once, at fit time, with the same messages as scoring.
        linear_head(h[:1], inputs["weight"], inputs["bias"], self.name)
        self.fit_info_["threshold"] = float(percentile(h, self.percentile))
        self.fit_info_["n_fit"] = int(h.shape[0])

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        h = inputs["penultimate"].clamp(max=self.fit_info_["threshold"])
        return energy_score(linear_head(h, inputs["weight"], inputs["bias"], self.name))
