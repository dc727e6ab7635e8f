"""MSP — maximum softmax probability.

Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution Examples in
Neural Networks", ICLR 2017.

Score: ``-max_c softmax(logits)_c`` (negated so that higher = more OOD).
Hyper-parameters: none.
"""

from __future__ import annotations

import torch

from oodscope.detectors.base import Detector, register
from oodscope.detectors.kinds import DetectorKind


@register
class MSP(Detector):
    name = "msp"
    kind = DetectorKind.OUTPUT
    requires = ("logits",)

    def __init__(self) -> None:
        super().__init__()

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return -torch.softmax(inputs["logits"], dim=1).amax(dim=1)
