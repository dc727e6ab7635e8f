"""ASH — activation shaping: per-image pruning of the penultimate activations, then the energy.

Djurisic, Bozanic, Ashok & Liu, "Extremely Simple Activation Shaping for Out-of-Distribution
Detection", ICLR 2023.

Per image, the ``k = D - round(D * percentile / 100)`` largest of the ``D`` penultimate activations
are kept and the rest set to 0 (no ID statistics, nothing to fit). With ``s1`` = sum of all
activations and ``s2`` = sum of the kept ones, the kept values then become:
  - ``ash_p``: unchanged (pruning only);
  - ``ash_b``: ``s1 / k`` each (binarized, total preserved);
  - ``ash_s``: multiplied by ``exp(s1 / s2)``.
Score: ``-logsumexp(h_shaped @ W.T + b)`` (energy of the recomputed logits; higher = more OOD).
Defaults: ``percentile=90`` for all three — OpenOOD v1.5 ``ash.yml`` (ASH-B at 90), the authors'
ImageNet config (``ash_s@90``) and the paper's "e.g. 90 %" pruning. The paper tunes the percentile
per variant and model (the authors' ``ash_b`` function defaults to 65): it is a hyper-parameter.
The paper applies ASH to the pooled penultimate vector, which is what ``Features.penultimate`` is.
It assumes non-negative (post-ReLU) activations; for an all-zero row ASH-S uses a factor of 1.
"""

from __future__ import annotations

from typing import ClassVar

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


class _ASH(Detector):

    kind = DetectorKind.OUTPUT
    requires = ("penultimate", "weight", "bias")
    variant: ClassVar[str] = ""

    def __init__(self, percentile: float = 90.0) -> None:
        super().__init__()
        self.percentile = check_percentile(percentile, self.name, allow_100=False)

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        h = inputs["penultimate"]
        if h.ndim == 2:  # otherwise linear_head below reports the bad shape
            h = self._shape(h, kept_count(h.shape[1], self.percentile, self.name))
        return energy_score(linear_head(h, inputs["weight"], inputs["bias"], self.name))

    def _shape(self, h: torch.Tensor, k: int) -> torch.Tensor:
        keep = top_k_mask(h, k)
        pruned = h * keep
        if self.variant == "p":
            return pruned
        if self.variant == "b":
            return keep.to(h.dtype) * (h.sum(dim=1, keepdim=True) / k)
        return pruned * torch.exp(sum_ratio(h, keep))


@register
class ASHP(_ASH):
    name = "ash_p"
    variant = "p"


@register
class ASHB(_ASH):
    name = "ash_b"
    variant = "b"


@register
class ASHS(_ASH):
    name = "ash_s"
    variant = "s"
