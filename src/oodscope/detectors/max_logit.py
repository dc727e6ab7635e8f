"""MaxLogit — the largest unnormalized logit.

Hendrycks, Basart, Mazeika, Zou, Kwon, Mostajabi, Steinhardt & Song, "Scaling Out-of-Distribution
Detection for Real-World Settings", ICML 2022.

Score: ``-max_c logits_c`` (negated so that higher = more OOD).
Hyper-parameters: none (OpenOOD v1.5 ``mls``).
"""

from __future__ import annotations

import torch

from oodscope.detectors._shaping import check_logits
from oodscope.detectors.base import Detector, register
from oodscope.detectors.kinds import DetectorKind


@register
class MaxLogit(Detector):
    name = "max_logit"
    kind = DetectorKind.OUTPUT
    requires = ("logits",)

    def __init__(self) -> None:
        super().__init__()

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return -check_logits(inputs["logits"], self.name).amax(dim=1)
