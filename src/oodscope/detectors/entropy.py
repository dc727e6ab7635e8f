"""Predictive entropy — Shannon entropy of the softmax distribution.

Used to tell examples of unknown classes from known ones by Lakshminarayanan, Pritzel & Blundell,
"Simple and Scalable Predictive Uncertainty Estimation using Deep Ensembles", NeurIPS 2017
(predictive entropy on unseen classes); GEN (Liu, Lochman & Zach, CVPR 2023) generalizes it.

Score: ``H(p) = -sum_c p_c log p_c`` with ``p = softmax(logits)`` (natural log; higher = more OOD).
Hyper-parameters: none.
"""

from __future__ import annotations

import torch

from oodscope.detectors._shaping import check_logits
from oodscope.detectors.base import Detector, register
from oodscope.detectors.kinds import DetectorKind


@register
class Entropy(Detector):
    name = "entropy"
    kind = DetectorKind.OUTPUT
    requires = ("logits",)

    def __init__(self) -> None:
        super().__init__()

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        # log_softmax stays finite where softmax underflows to 0, so p * log p is 0 there, not NaN.
        log_p = torch.log_softmax(check_logits(inputs["logits"], self.name), dim=1)
        return -(log_p.exp() * log_p).sum(dim=1)
