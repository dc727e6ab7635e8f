"""KL matching — distance of the softmax to per-class ID softmax templates.

Hendrycks, Basart, Mazeika, Zou, Kwon, Mostajabi, Steinhardt & Song, "Scaling Out-of-Distribution
Detection for Real-World Settings", ICML 2022.

Fit: for every class ``c``, the template ``d_c`` is the mean softmax of the ID images the model
*predicts* as ``c`` (no labels needed). Score: ``min_c KL(p || d_c)`` with ``p = softmax(logits)``
(higher = more OOD). Direction and templates as in the paper and OpenOOD v1.5
``kl_matching_postprocessor.py`` (``scipy.stats.entropy(p, d_c)`` = KL(p || d_c)).
Hyper-parameters: none. Classes that no ID image is predicted as get no template (OpenOOD gives
them a one-hot template, whose KL from any softmax is infinite, i.e. never the minimum).
"""

from __future__ import annotations

import torch

from oodscope.detectors._shaping import check_logits
from oodscope.detectors.base import Detector, DetectorError, register
from oodscope.detectors.kinds import DetectorKind

# Rows of ID logits turned into softmax at once while fitting (bounds memory for large N x C).
_FIT_CHUNK = 8192


@register
class KLMatching(Detector):
    name = "kl_matching"
    kind = DetectorKind.OUTPUT
    requires = ("logits",)
    needs_fit = True

    def __init__(self) -> None:
        super().__init__()

    def _fit(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None) -> None:
        logits = check_logits(inputs["logits"], self.name)
        n, c = logits.shape
        if n == 0:
            raise DetectorError("kl_matching: fit needs at least one in-distribution image")
        sums = torch.zeros(c, c, dtype=torch.float64, device=logits.device)
        counts = torch.zeros(c, dtype=torch.float64, device=logits.device)
        for start in range(0, n, _FIT_CHUNK):
            chunk = logits[start : start + _FIT_CHUNK].to(torch.float64)
            p = torch.softmax(chunk, dim=1)
            predicted = chunk.argmax(dim=1)
            sums.index_add_(0, predicted, p)
            counts.index_add_(0, predicted, torch.ones_like(predicted, dtype=torch.float64))
        has_template = counts > 0
        templates = sums / counts.clamp(min=1.0)[:, None]
        # A template entry can underflow to 0 (softmax below 1e-308); flooring it keeps KL finite
        # and huge there instead of producing 0 * inf = NaN for test softmaxes that also underflow.
        log_templates = templates.clamp(min=torch.finfo(torch.float64).tiny).log()
        log_templates[~has_template] = 0.0
        self.state_["log_templates"] = log_templates
        self.state_["has_template"] = has_template.to(torch.float64)
        self.fit_info_["n_fit"] = int(n)
        self.fit_info_["classes_without_template"] = int((~has_template).sum())

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = check_logits(inputs["logits"], self.name)
        log_templates = self._state("log_templates", logits)
        if logits.shape[1] != log_templates.shape[0]:
            raise DetectorError(
                f"kl_matching: fitted on {log_templates.shape[0]} classes, got logits with {logits.shape[1]}"
            )
        log_p = torch.log_softmax(logits, dim=1)
        p = log_p.exp()
        # KL(p || d_c) = sum_j p_j log p_j - sum_j p_j log d_cj, for all classes c at once.
        kl = (p * log_p).sum(dim=1, keepdim=True) - p @ log_templates.T
        has_template = self._state("has_template", logits) > 0.5
        kl = kl.masked_fill(~has_template[None, :], float("inf"))
        return kl.amin(dim=1)
