"""Temperature-scaled MSP — maximum softmax probability of ``logits / T``.

Liang, Li & Srikant, "Enhancing the Reliability of Out-of-distribution Image Detection in Neural
Networks" (ODIN), ICLR 2018 — the temperature-scaling half of ODIN, without input perturbation,
so it works from cached logits (the ``odin`` detector adds the perturbation). Temperature scaling
itself is from Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural Networks", ICML 2017.

Score: ``-max_c softmax(logits / T)_c`` (negated so that higher = more OOD).
Defaults: ``temperature=1000`` — ODIN's choice for OOD detection (paper; OpenOOD v1.5 ``odin.yml``).
Guo et al. fit T (about 1-3) for calibration instead; that value can be passed, and
``temperature=1`` gives plain MSP. The scores of a large T lie just below ``-1/C``: they rank images
well but are not probabilities.
"""

from __future__ import annotations

import torch

from oodscope.detectors._shaping import check_logits
from oodscope.detectors.base import Detector, DetectorError, register
from oodscope.detectors.kinds import DetectorKind


@register
class TemperatureMSP(Detector):
    name = "temperature_msp"
    kind = DetectorKind.OUTPUT
    requires = ("logits",)

    def __init__(self, temperature: float = 1000.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise DetectorError(f"temperature_msp: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = check_logits(inputs["logits"], self.name)
        return -torch.softmax(logits / self.temperature, dim=1).amax(dim=1)
