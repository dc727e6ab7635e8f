"""Relation — similarity to the in-distribution bank through the neural relation graph's kernel.

Kim, Yun & Song, "Neural Relation Graph: A Unified Framework for Identifying Label Noise and
Outlier Data", NeurIPS 2023; official code ``snu-mllab/Neural-Relation-Graph`` (``relation.py``,
``detect_ood.py``), ported to OpenOOD v1.5 as ``relation_postprocessor.py``.
"""

from __future__ import annotations

import torch

from oodscope.detectors._feature_select import FeatureField
from oodscope.detectors._neighbors import l2_normalize
from oodscope.detectors.base import Detector, DetectorError, register
from oodscope.detectors.kinds import DetectorKind

#: Bank rows per block of the (rows x bank) kernel matrix (bounds memory, ~rows x BANK_BLOCK floats).
BANK_BLOCK = 8192


@register
class Relation(FeatureField, Detector):
    """Relation (Kim et al., NeurIPS 2023): the summed edge weights of a test image to the ID bank.

    Score: ``-sum_j s_j^t [s_j > thres]`` with ``s_j = max(0, <z, z_j>) * <p, p_j>`` — the official
    ``cos_p`` kernel: cosine similarity of the L2-normalised features, clamped at 0, times the inner
    product of the softmax probabilities; ``z_j, p_j`` are the ID bank's (higher = more OOD).
    The official ``detect_ood.py`` scores ``1 / (sum + 1e-6)`` and OpenOOD the sum itself as a
    confidence; since the sum is never negative, all three rank images identically.
    Defaults: ``power=1`` (the temperature ``t``: OpenOOD ``relation.yml`` ``pow: 1``; the official
    ``detect_ood.py`` warns that ``pow != 1`` "is not optimal for OOD detection"), ``threshold=0.03``
    (``get_relation``'s ``thres``), the whole fit set as the bank (official ``hop=1``).
    ``feature="penultimate"`` (default) or ``"embedding"``; needs ``logits`` for the probabilities.
    """

    name = "relation"
    kind = DetectorKind.FEATURE
    requires = ("penultimate", "logits")
    extra_requires = ("logits",)
    feature_choices = ("penultimate", "embedding")
    needs_fit = True
    score_batch_size = 1024

    def __init__(self, power: float = 1.0, threshold: float = 0.03, feature: str = "penultimate") -> None:
        super().__init__()
        if not power > 0:
            raise DetectorError(f"{self.name}: power must be > 0, got {power}")
        if not threshold >= 0:
            raise DetectorError(f"{self.name}: threshold must be >= 0, got {threshold}")
        self.power = float(power)
        self.threshold = float(threshold)
        self.feature = feature
        self._check_feature(feature)

    def _fit(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None) -> None:
        self._record_fields()
        x, logits = inputs["x"], inputs["logits"]
        if x.ndim != 2 or len(x) == 0 or logits.ndim != 2:
            raise DetectorError(f"{self.name}: fit needs non-empty (N, D) features and (N, C) logits")
        self.state_["bank"] = l2_normalize(x.to(torch.float64))
        self.state_["bank_probs"] = torch.softmax(logits.to(torch.float64), dim=1)

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        # float64: an edge close to the threshold must not flip with the batch's BLAS blocking.
        x = inputs["x"].to(torch.float64)
        bank = self._state("bank", x)
        bank_probs = self._state("bank_probs", x)
        self._check_width(x, bank.shape[1])
        if inputs["logits"].shape[1] != bank_probs.shape[1]:
            raise DetectorError(
                f"{self.name}: fitted with {bank_probs.shape[1]} classes, logits have {inputs['logits'].shape[1]}"
            )
        z = l2_normalize(x)
        probs = torch.softmax(inputs["logits"].to(torch.float64), dim=1)
        total = torch.zeros(len(z), dtype=torch.float64, device=z.device)
        for start in range(0, len(bank), BANK_BLOCK):
            rel = (z @ bank[start : start + BANK_BLOCK].T).clamp_min(0.0)
            rel = rel * (probs @ bank_probs[start : start + BANK_BLOCK].T)
            # Edges at or below the threshold are cut (official: mask = |rel| > thres); rel >= 0 here.
            kept = torch.where(rel > self.threshold, rel.pow(self.power), torch.zeros_like(rel))
            total += kept.sum(dim=1)
        return -total
