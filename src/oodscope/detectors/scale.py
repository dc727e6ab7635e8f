"""SCALE — ASH-S's per-image scale factor applied to the *unpruned* penultimate activations.

Xu, Chen, Franchi & Yao, "Scaling for Training Time and Post-hoc Out-of-distribution Detection
Enhancement", ICLR 2024 (the post-hoc part; ISH, the training-time part, is not a detector).

Per image, with ``k = D - round(D * percentile / 100)``, ``s1`` = sum of all ``D`` activations and
``s2`` = sum of the ``k`` largest: ``h' = h * exp(s1 / s2)`` — nothing is pruned, the top-k only
sets the factor. Score: ``-logsumexp(h' @ W.T + b)`` (energy; higher = more OOD). Nothing to fit.
Defaults: ``percentile=85`` (authors' code ``configs/postprocessors/scale.yml``; OpenOOD v1.5
``scale.yml``). Assumes non-negative (post-ReLU) activations; an all-zero row gets a factor of 1.
"""

from __future__ import annotations

import torch

from oodscope.detectors._shaping import (
    check_percentile,
    energy_score,
    kept_count,
    linear_head,
    sum_ratio,
    top_k_mask,
)
from oodscope.detectors.base import Detector, register
from oodscope.detectors.kinds import DetectorKind


@register
class SCALE(Detector):
    name = "scale"
    kind = DetectorKind.OUTPUT
    requires = ("penultimate", "weight", "bias")

    def __init__(self, percentile: float = 85.0) -> None:
        super().__init__()
        self.percentile = check_percentile(percentile, self.name, allow_100=False)

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        h = inputs["penultimate"]
        if h.ndim == 2:  # otherwise linear_head below reports the bad shape
            keep = top_k_mask(h, kept_count(h.shape[1], self.percentile, self.name))
            h = h * torch.exp(sum_ratio(h, keep))
        return energy_score(linear_head(h, inputs["weight"], inputs["bias"], self.name))
