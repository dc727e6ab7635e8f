"""SHE — simplified Hopfield energy against stored class patterns.

Zhang, Fu, Chen, Du, Li, Wang, Liu, Han & Zhang, "Out-of-Distribution Detection based on
In-Distribution Data Patterns Memorization with Modern Hopfield Energy", ICLR 2023.

Fit: the stored pattern ``s_c`` of class c is the mean penultimate feature of the ID samples of
class c (only those the classifier predicts correctly when ``correct_only``). Score:
``-<x, s_yhat>`` with ``yhat = argmax logits`` — the paper's simplified Hopfield energy, one
pattern per class (the ID score it thresholds is ``<x, s_yhat>``).
Defaults: ``correct_only=True`` and inner-product similarity, as OpenOOD v1.5 (``she.yml``:
``metric: inner_product``; its ``she_postprocessor`` keeps correctly classified samples only).
With ``correct_only``, a class with no correctly classified sample falls back to the mean of all
its samples; a class with no sample at all has no pattern, and an image predicted as that class
is compared with its best-matching stored pattern instead (``-max_c <x, s_c>``), which keeps
scores finite (metrics and conformal calibration need finite scores). Both cases are listed in
``fit_info_``.
"""

from __future__ import annotations

import torch

from oodscope.detectors import _gaussian as g
from oodscope.detectors._feature_select import FeatureField
from oodscope.detectors.base import Detector, DetectorError, register
from oodscope.detectors.kinds import DetectorKind


@register
class SHE(FeatureField, Detector):
    name = "she"
    kind = DetectorKind.FEATURE
    requires = ("penultimate", "logits")
    extra_requires = ("logits",)
    feature_choices = ("penultimate", "embedding")
    needs_fit = True
    needs_labels = True

    def __init__(self, correct_only: bool = True, feature: str = "penultimate") -> None:
        super().__init__()
        self.correct_only = correct_only
        self.feature = feature
        self._check_feature(feature)

    def _fit(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None) -> None:
        self._record_fields()
        x = g.check_matrix(inputs["x"], self.name)
        logits = inputs["logits"]
        n_classes = logits.shape[1]
        if int(labels.min()) < 0 or int(labels.max()) >= n_classes:
            raise DetectorError(f"{self.name}: labels must be in [0, {n_classes}) to match the logits")
        correct = logits.argmax(dim=1) == labels
        if not self.correct_only:
            correct = torch.ones_like(correct)
        # Misclassified samples get an out-of-range label so they are counted in no class.
        masked = torch.where(correct, labels, torch.full_like(labels, n_classes))
        patterns, counts = g.class_means(x, masked, n_classes + 1)
        patterns, counts = patterns[:n_classes], counts[:n_classes]
        all_means, all_counts = g.class_means(x, labels, n_classes)
        fallback = (counts == 0) & (all_counts > 0)
        patterns[fallback] = all_means[fallback]
        empty = all_counts == 0
        self.state_["patterns"] = patterns
        self.state_["has_pattern"] = (~empty).to(torch.uint8)
        self.fit_info_["classes_without_correct_samples"] = torch.nonzero(fallback).flatten().tolist()
        self.fit_info_["classes_without_samples"] = torch.nonzero(empty).flatten().tolist()

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = inputs["x"].to(torch.float64)
        self._check_width(x, self.state_["patterns"].shape[1])
        patterns = self._state("patterns", x)
        if inputs["logits"].shape[1] != len(patterns):
            raise DetectorError(
                f"{self.name}: fitted with {len(patterns)} classes, logits have {inputs['logits'].shape[1]}"
            )
        pred = inputs["logits"].argmax(dim=1)
        score = -(x * patterns[pred]).sum(dim=1)
        has_pattern = self.state_["has_pattern"].to(x.device).bool()
        known = has_pattern[pred]
        if bool(known.all()):
            return score
        best = (x @ patterns[has_pattern].T).amax(dim=1)
        return torch.where(known, score, -best)
