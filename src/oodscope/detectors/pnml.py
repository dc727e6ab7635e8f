"""pNML — the regret of the single-layer predictive normalized maximum likelihood.

Bibas, Feder & Hassner, "Single Layer Predictive Normalized Maximum Likelihood for
Out-of-Distribution Detection", NeurIPS 2021; official code ``kobybibas/pnml_ood_detection``
(``src/lit_utils/baseline_lit_utils.py``: ``training_epoch_end`` and ``calc_regrets``).
"""

from __future__ import annotations

import math

import torch

from oodscope.detectors import _gaussian as g
from oodscope.detectors._neighbors import l2_normalize
from oodscope.detectors._shaping import linear_head
from oodscope.detectors.base import Detector, DetectorError, register
from oodscope.detectors.kinds import DetectorKind


@register
class PNML(Detector):
    """pNML (Bibas, Feder & Hassner, NeurIPS 2021): the regret of the last layer's pNML learner.

    Score: ``log(sum_c p_c / (p_c + (1 - p_c) p_c^g)) / log C``, ``g = q / (1 + q)``, ``q = x^T (X^T X)^+ x``
    — the normalised regret, in [0, 1], higher = more OOD (the paper's ID score is ``1 - regret``).
    ``x`` is the L2-normalised penultimate feature, ``X`` the (N, D) matrix of L2-normalised ID
    features, and ``p = softmax(W x + b)`` the prediction of the *normalised* feature through the
    classifier's last layer (as the official ``forward``: ``self.w(features / norm)``).
    Defaults: ``rcond=None`` — eigenvalues of ``X^T X`` below ``D * eps * lambda_max`` (float64) are
    dropped from the pseudo-inverse (``scipy.linalg.pinvh``'s rule); the official code calls
    ``torch.linalg.pinv(x_t_x, rcond=1e-15)`` in float32, i.e. no cut-off for the full-rank ``X^T X``
    of its 50,000-image training sets, where both agree. No other hyper-parameter.
    """

    name = "pnml"
    kind = DetectorKind.FEATURE
    requires = ("penultimate", "weight", "bias")
    needs_fit = True

    def __init__(self, rcond: float | None = None) -> None:
        super().__init__()
        if rcond is not None and not 0.0 <= rcond < 1.0:
            raise DetectorError(f"{self.name}: rcond must be in [0, 1) or None, got {rcond}")
        self.rcond = rcond

    def _fit(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None) -> None:
        x = g.check_matrix(inputs["penultimate"], self.name)
        linear_head(x[:1], inputs["weight"], inputs["bias"], self.name)
        z = l2_normalize(x.to(torch.float64))
        # (X^T X)^+ = pinv(X^T X / n) / n; the whitener W has W W^T = pinv(X^T X / n), so the
        # projection x^T (X^T X)^+ x = ||x W||^2 / n is computed without the (D, D) inverse, never < 0.
        second_moment = g.covariance(z, torch.zeros(z.shape[1], dtype=torch.float64, device=z.device))
        self.state_["whitener"] = g.whitener(second_moment, self.rcond) / math.sqrt(len(z))
        self.fit_info_["rank"] = int(self.state_["whitener"].shape[1])

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = inputs["penultimate"].to(torch.float64)
        whitener = self._state("whitener", x)
        if x.ndim != 2 or x.shape[1] != whitener.shape[0]:
            raise DetectorError(f"{self.name}: fitted on {whitener.shape[0]}-d penultimate, got shape {tuple(x.shape)}")
        z = l2_normalize(x)
        projection = ((z @ whitener) ** 2).sum(dim=1, keepdim=True)
        g_x = projection / (1.0 + projection)
        probs = torch.softmax(linear_head(z, inputs["weight"], inputs["bias"], self.name), dim=1)
        n_classes = probs.shape[1]
        if n_classes < 2:
            raise DetectorError(f"{self.name}: needs at least 2 classes, got {n_classes}")
        # p / (p + (1 - p) p^g) written as 1 / (1 + (1 - p) p^(g - 1)): a probability that underflows
        # to 0 then contributes 0 (its limit, g < 1) instead of 0 / 0.
        normaliser = (1.0 / (1.0 + (1.0 - probs) * probs.pow(g_x - 1.0))).sum(dim=1)
        return torch.log(normaliser) / math.log(n_classes)
