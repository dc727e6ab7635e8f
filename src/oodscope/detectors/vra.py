"""VRA — variational rectified activation, then the energy.

Xu, Lian, Liu & Tao, "VRA: Variational Rectified Activation for Out-of-distribution Detection",
NeurIPS 2023; official code ``zeroQiaoba/VRA`` (``ood_eval.py``, ``models/resnet.py``).
"""

from __future__ import annotations

import math

import torch

from oodscope.detectors._shaping import check_percentile, energy_score, linear_head, percentile
from oodscope.detectors.base import Detector, DetectorError, register
from oodscope.detectors.kinds import DetectorKind

SCOPES = ("per_unit", "global")


def column_percentile(h: torch.Tensor, q: float) -> torch.Tensor:
    """(D,) the ``q``-th percentile of each column, linear interpolation (``torch.quantile(h, q / 100, dim=0)``,
    which the official code calls; ``kthvalue`` has no 16M-element limit)."""
    n = h.shape[0]
    position = (q / 100.0) * (n - 1)
    lo = min(int(math.floor(position)), n - 1)
    hi = min(lo + 1, n - 1)
    v_lo = torch.kthvalue(h, lo + 1, dim=0).values
    if position == lo or hi == lo:
        return v_lo
    return v_lo + (torch.kthvalue(h, hi + 1, dim=0).values - v_lo) * (position - lo)


def rectify(h: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, gamma: float) -> torch.Tensor:
    """The paper's piecewise VRA(+) function: 0 below alpha, ``h + gamma`` on [alpha, beta], beta above."""
    out = torch.where(h < alpha, torch.zeros_like(h), h + gamma)
    return torch.where(h > beta, beta.expand_as(h), out)


@register
class VRA(Detector):
    """VRA (Xu et al., NeurIPS 2023): energy of the logits of rectified penultimate activations.

    Score: ``-logsumexp(VRA(h) W^T + b)`` with ``VRA(h) = 0 if h < alpha; h + gamma if alpha <= h <= beta;
    beta if h > beta`` (the official code scores ``+logsumexp`` as an ID confidence; this is its negative).
    Fit: ``alpha`` / ``beta`` = the ``percentile_low`` / ``percentile_high`` percentiles of the ID
    activations — of each unit separately (``scope="per_unit"``: the official ``ood_eval.py``,
    ``torch.quantile(feat, q, dim=0)``) or of all units pooled (``scope="global"``, as OpenOOD's
    ``vra_postprocessor.py``, which however clips *up* to alpha instead of zeroing below it).
    Defaults: ``percentile_low=60``, ``percentile_high=90``, ``gamma=0`` — the official README's VRA
    command for CIFAR-10 (``--q1 0.6 --q2 0.9``; VRA+ is ``--q2 0.95 --lamb 0.6``, ``lamb`` = our ``gamma``);
    ``scope="per_unit"`` as that command. (ImageNet runs in the README pass absolute thresholds,
    e.g. 0.5 / 1.0 for ResNet-50; OpenOOD's ``vra.yml`` uses global percentiles 10 / 90.)
    """

    name = "vra"
    kind = DetectorKind.OUTPUT
    requires = ("penultimate", "weight", "bias")
    needs_fit = True

    def __init__(
        self,
        percentile_low: float = 60.0,
        percentile_high: float = 90.0,
        gamma: float = 0.0,
        scope: str = "per_unit",
    ) -> None:
        super().__init__()
        self.percentile_low = check_percentile(percentile_low, self.name, allow_100=True)
        self.percentile_high = check_percentile(percentile_high, self.name, allow_100=True)
        self.gamma = float(gamma)
        self.scope = scope
        if self.percentile_low > self.percentile_high:
            raise DetectorError(
                f"{self.name}: percentile_low ({percentile_low}) must not exceed percentile_high ({percentile_high})"
            )
        if scope not in SCOPES:
            raise DetectorError(f"{self.name}: scope must be one of {list(SCOPES)}, got {scope!r}")

    def _fit(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None) -> None:
        h = inputs["penultimate"]
        if h.ndim != 2 or len(h) == 0:
            raise DetectorError(f"{self.name}: fit needs a non-empty (N, D) penultimate matrix")
        linear_head(h[:1], inputs["weight"], inputs["bias"], self.name)  # shape checks once, at fit time
        if self.scope == "per_unit":
            low = column_percentile(h, self.percentile_low)
            high = column_percentile(h, self.percentile_high)
        else:
            low = percentile(h, self.percentile_low).expand(h.shape[1])
            high = percentile(h, self.percentile_high).expand(h.shape[1])
        self.state_["alpha"] = low.to(torch.float64).clone()
        self.state_["beta"] = high.to(torch.float64).clone()

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        h = inputs["penultimate"].to(torch.float64)
        alpha = self._state("alpha", h)
        if h.ndim != 2 or h.shape[1] != alpha.shape[0]:
            raise DetectorError(f"{self.name}: fitted on {alpha.shape[0]}-d penultimate, got shape {tuple(h.shape)}")
        shaped = rectify(h, alpha, self._state("beta", h), self.gamma)
        return energy_score(linear_head(shaped, inputs["weight"], inputs["bias"], self.name))
