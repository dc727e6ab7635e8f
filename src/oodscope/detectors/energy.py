"""Energy score.

Liu, Wang, Owens & Li, "Energy-based Out-of-distribution Detection", NeurIPS 2020.

Score: ``E(x) = -T * logsumexp(logits / T)`` — the paper's free energy, which is already higher for
OOD inputs (the paper thresholds the negative energy as an ID score).
Defaults: ``temperature=1`` (paper; OpenOOD v1.5 ``ebo.yml``).
"""

from __future__ import annotations

import torch

from oodscope.detectors._shaping import check_logits, energy_score
from oodscope.detectors.base import Detector, DetectorError, register
from oodscope.detectors.kinds import DetectorKind


@register
class Energy(Detector):
    name = "energy"
    kind = DetectorKind.OUTPUT
    requires = ("logits",)

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise DetectorError(f"energy: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return energy_score(check_logits(inputs["logits"], self.name), self.temperature)
