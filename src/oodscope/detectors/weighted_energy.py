"""Weighted energy — the energy with learned non-negative class weights inside the log-sum-exp.

Du, Wang, Cai & Li, "VOS: Learning What You Don't Know by Virtual Outlier Synthesis", ICLR 2022
(the energy of its uncertainty-regularization loss, with one learnable weight per class).

Score: ``-log sum_k relu(w_k) * exp(logits_k)`` (higher = more OOD).
Hyper-parameters: ``class_weights`` — one weight per class, **required, no default**. In VOS the
weights are learned jointly with the network (a ``Linear(C, 1)`` layer, ReLU'd when used); pass
that layer's weight row as is. They are not something a post-hoc fit on ID features can recover,
so this detector only makes sense for models trained with such weights. All-equal weights ``w``
reduce it to ``energy`` (T = 1) shifted by ``-log w``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from oodscope.detectors._shaping import check_logits
from oodscope.detectors.base import Detector, DetectorError, register
from oodscope.detectors.kinds import DetectorKind


@register
class WeightedEnergy(Detector):
    name = "weighted_energy"
    kind = DetectorKind.OUTPUT
    requires = ("logits",)

    def __init__(self, class_weights: Sequence[float]) -> None:
        super().__init__()
        try:
            weights = [float(w) for w in class_weights]
        except TypeError:
            raise DetectorError("weighted_energy: class_weights must be a sequence of numbers") from None
        if not weights:
            raise DetectorError("weighted_energy: class_weights is empty")
        if any(w != w or w in (float("inf"), float("-inf")) for w in weights):
            raise DetectorError("weighted_energy: class_weights must be finite")
        if max(weights) <= 0:
            raise DetectorError("weighted_energy: at least one class weight must be > 0 (VOS applies ReLU)")
        # Plain floats so the parameters stay JSON-able when the detector is saved.
        self.class_weights = weights

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = check_logits(inputs["logits"], self.name)
        if logits.shape[1] != len(self.class_weights):
            raise DetectorError(
                f"weighted_energy: {len(self.class_weights)} class_weights but logits have "
                f"{logits.shape[1]} classes"
            )
        w = torch.tensor(self.class_weights, dtype=logits.dtype, device=logits.device).clamp(min=0.0)
        # log(w) is -inf for zero weights: those classes simply drop out of the log-sum-exp.
        return -torch.logsumexp(logits + w.log(), dim=1)
