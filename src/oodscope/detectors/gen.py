"""GEN — generalized entropy over the top-M softmax probabilities.

Liu, Lochman & Zach, "GEN: Pushing the Limits of Softmax-Based Out-of-Distribution Detection",
CVPR 2023.

Score: ``G(p) = sum_{j in top-M(p)} p_j^gamma * (1 - p_j)^gamma`` with ``p = softmax(logits)``
(higher = more uncertain = more OOD; OpenOOD returns ``-G`` as a confidence).
Defaults: ``gamma=0.1``, ``M=100`` (OpenOOD v1.5 ``gen.yml``, its benchmark setting of GEN). ``M``
is clipped to the number of classes, which is what taking the last ``M`` sorted probabilities does.
"""

from __future__ import annotations

import torch

from oodscope.detectors._shaping import check_logits
from oodscope.detectors.base import Detector, DetectorError, register
from oodscope.detectors.kinds import DetectorKind


@register
class GEN(Detector):
    name = "gen"
    kind = DetectorKind.OUTPUT
    requires = ("logits",)

    def __init__(self, gamma: float = 0.1, M: int = 100) -> None:
        super().__init__()
        if not gamma > 0:
            raise DetectorError(f"gen: gamma must be > 0, got {gamma}")
        if int(M) != M or M < 1:
            raise DetectorError(f"gen: M must be a positive integer, got {M}")
        self.gamma = float(gamma)
        self.M = int(M)

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        p = torch.softmax(check_logits(inputs["logits"], self.name), dim=1)
        top = torch.topk(p, min(self.M, p.shape[1]), dim=1).values
        # clamp: rounding can put a softmax entry a hair above 1, and a negative base to a
        # fractional power is NaN.
        return (top.pow(self.gamma) * (1.0 - top).clamp(min=0.0).pow(self.gamma)).sum(dim=1)
