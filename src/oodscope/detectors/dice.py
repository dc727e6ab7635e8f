"""DICE — directed sparsification of the last layer by ID contribution, then the energy.

Sun & Li, "DICE: Leveraging Sparsification for Out-of-Distribution Detection", ECCV 2022.

Fit: ``V = mean_ID(h)[None, :] * W`` (C x D: the average contribution of unit j to class c);
the mask ``M = V > percentile_p(V)`` keeps the top ``(100 - p)`` % of the weights, by one threshold
over all C x D entries (authors' ``RouteDICE``; OpenOOD v1.5 ``dice_postprocessor.py``).
Score: ``-logsumexp(h @ (W * M).T + b)`` (energy of the sparsified logits; higher = more OOD).
Defaults: ``p=90`` (sparsity; authors' CIFAR demo ``demo-cifar.sh``; OpenOOD v1.5 ``dice.yml``).
The mask is fitted with the head it was computed from, so score with the same backbone's features.
"""

from __future__ import annotations

import torch

from oodscope.detectors._shaping import check_percentile, energy_score, linear_head, percentile
from oodscope.detectors.base import Detector, DetectorError, register
from oodscope.detectors.kinds import DetectorKind


@register
class DICE(Detector):
    name = "dice"
    kind = DetectorKind.OUTPUT
    requires = ("penultimate", "weight", "bias")
    needs_fit = True

    def __init__(self, p: float = 90.0) -> None:
        super().__init__()
        self.p = check_percentile(p, self.name, allow_100=False)

    def _fit(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None) -> None:
        h = inputs["penultimate"]
        if len(h) == 0:
            raise DetectorError(f"{self.name}: fit needs at least one in-distribution image")
        linear_head(h[:1], inputs["weight"], inputs["bias"], self.name)  # shape checks
        weight = inputs["weight"].to(torch.float64)
        # Summed in float64 by row chunks: a float64 copy of a large ID activation log is avoided.
        mean_activation = sum(chunk.sum(dim=0, dtype=torch.float64) for chunk in h.split(8192)) / len(h)
        contribution = mean_activation[None, :] * weight
        threshold = percentile(contribution, self.p)
        self.state_["mean_activation"] = mean_activation
        self.state_["mask"] = (contribution > threshold).to(torch.float64)
        self.fit_info_["threshold"] = float(threshold)
        self.fit_info_["kept_fraction"] = float(self.state_["mask"].mean())
        self.fit_info_["n_fit"] = int(h.shape[0])

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        h, weight = inputs["penultimate"], inputs["weight"]
        mask = self._state("mask", h)
        if weight.shape != mask.shape:
            raise DetectorError(
                f"dice: fitted on a head of shape {tuple(mask.shape)}, "
                f"got weight of shape {tuple(weight.shape)}"
            )
        masked = weight.to(dtype=h.dtype) * mask
        return energy_score(linear_head(h, masked, inputs["bias"], self.name))
