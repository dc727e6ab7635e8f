"""GDA — Gaussian discriminant analysis on image embeddings, ensembled with the zero-shot classifier.

Wang, Liang, Sheng, He, Wang, Tan, "A Hard-to-Beat Baseline for Training-free CLIP-based
Adaptation", ICLR 2024 (official code: github.com/mrflogs/ICLR24).

Score: ``S(logit_scale * cos(x, t) + alpha * (x W^T + b))`` with ``x`` the L2-normalized image
embedding, ``t`` the class text embeddings and ``S`` the output score (default ``-max softmax``).
The GDA classifier uses the class means ``mu_k`` of the normalized fit embeddings and one shared
precision matrix ``P``: ``W = mu P``, ``b_k = log(1/K) - 1/2 mu_k P mu_k^T``.

``P`` is the official code's covariance-inverse estimator (its "KS estimator", the ridge-type
empirical-Bayes estimator of Kubokawa & Srivastava): ``P = D * pinv(S + tr(S) / (N - 1) * I)``
with ``S`` the within-class scatter matrix (sum over the N fit images of ``(x - mu_y)(x - mu_y)^T``)
and D the embedding dimension. When ``S`` is zero (one image per class, or identical images) the
estimator has no data: the GDA term is then zero, the detector is the zero-shot classifier, and
``fit_info_["gda_degenerate"]`` is true.

Defaults:
- ``logit_scale=100``: the official code's zero-shot logits ``100 * cos`` (CLIP's learned scale).
- ``alpha=1.0``: not a constant of the paper, which selects alpha per dataset on validation data
  from {1e-4, 1e-3, ..., 100}; 1.0 is the value that search picked most often in the authors'
  released few-shot logs (46 of 165 runs). Tune it when validation data exist.
- uniform class priors (official code); ``templates="simple"`` (one prompt "a photo of a {}.";
  the paper uses dataset-specific prompts); ``scoring="msp"`` (OpenOOD-style MSP on the ensembled
  logits; ``"energy"`` and ``"gen"`` are available, ``scoring_params`` are their parameters).
The official code also caches 10 augmented views of each training image; here the fit features
are used as given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from oodscope.detectors import _gaussian as g
from oodscope.detectors._fewshot import FewShotPromptDetector, check_positive, score_logits, set_logit_scoring
from oodscope.detectors.base import DetectorError, register


def ks_precision(x: torch.Tensor, labels: torch.Tensor, means: torch.Tensor) -> torch.Tensor | None:
    """``D * pinv(S + tr(S)/(N-1) I)`` (float64), or None when the within-class scatter S is zero."""
    n, d = x.shape
    scatter = g.tied_covariance(x, labels, means) * n
    trace = float(torch.trace(scatter))
    # Unit-norm rows: deviations are O(1), so this only catches scatter that is zero up to rounding.
    if n < 2 or trace <= 1e-12 * n:
        return None
    ridge = trace / (n - 1)
    eye = torch.eye(d, dtype=torch.float64, device=x.device)
    return d * g.precision(scatter + ridge * eye)


@register
class GDA(FewShotPromptDetector):
    name = "gda"

    def __init__(
        self,
        classes: Sequence[str],
        alpha: float = 1.0,
        logit_scale: float = 100.0,
        scoring: str = "msp",
        scoring_params: dict[str, Any] | None = None,
        **prompt_options: Any,
    ) -> None:
        super().__init__()
        self._set_text_params(classes, **prompt_options)
        self.alpha = check_positive(alpha, "alpha", self.name, allow_zero=True)
        self.logit_scale = check_positive(logit_scale, "logit_scale", self.name)
        set_logit_scoring(self, scoring, scoring_params)

    def _learn(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        x = torch.nn.functional.normalize(inputs["embedding"].to(torch.float64), dim=-1)
        k = len(self.classes)
        means, counts = g.class_means(x, labels, k)
        if bool((counts == 0).any()):
            empty = [self.classes[i] for i in torch.nonzero(counts == 0).flatten().tolist()]
            raise DetectorError(f"gda: every class needs at least one labelled image; none for {empty}")
        prec = ks_precision(x, labels, means)
        degenerate = prec is None
        if degenerate:
            prec = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        log_priors = torch.full((k,), -math.log(k), dtype=torch.float64, device=x.device)
        weight, bias = g.linear_discriminant(means, prec, log_priors)
        self.state_["gda_weight"] = weight
        self.state_["gda_bias"] = bias
        self.fit_info_["gda_degenerate"] = degenerate
        self.fit_info_["shots_min"] = int(counts.min())

    def gda_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``x W^T + b`` on the normalized embeddings (float64)."""
        xu = torch.nn.functional.normalize(x.to(torch.float64), dim=-1)
        return xu @ self._state("gda_weight", xu).T + self._state("gda_bias", xu)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The ensembled logits that the score is computed from (N, K), float64."""
        out = self._zero_shot_logits(x, self.logit_scale)
        if self.alpha:
            out = out + self.alpha * self.gda_logits(x)
        return out

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return score_logits(self._scorer, self.logits(inputs["embedding"]))
