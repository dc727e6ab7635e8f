"""ViM — virtual-logit matching.

Wang, Li, Feng & Zhang, "ViM: Out-Of-Distribution with Virtual-logit Matching", CVPR 2022.

Fit on ID penultimate features ``x``: origin ``u = -pinv(W) b``; principal subspace P = the top
``dim`` eigenvectors of the second-moment matrix of ``x - u``; residual ``r(x) = ||(x - u)
projected onto P-perp||``; ``alpha = mean_i max_c logit_ic / mean_i r(x_i)`` over the fitting set.
Score: ``alpha * r(x) - logsumexp(W x + b)`` — the log-odds of the virtual class in the paper's
softmax over ``[logits, alpha * r(x)]`` (monotone in its probability; the paper's ID score is the
negative).
Defaults: ``dim=None`` is a rule of the feature width ``d`` and the number of fit images ``n``:
``dim = min(w(d), max(1, n // 2))`` where ``w(d)`` is the official code's width rule — 1000 if
``d >= 2048``, 512 if ``d >= 768``, else ``d // 2`` (the paper uses D=1000 for 2048-d ResNet/BiT and
512 for 768-d ViT-B; OpenOOD v1.5 ``vim.yml`` uses 256 for its CIFAR ResNet-18 and sweeps
[256, 1000]). The cap ``n // 2`` keeps the subspace below the fit set (half of the fit images' span
is left to the residual), so 1,280-d EfficientNet features give dim = 50 / 500 / 512 at
n = 100 / 1,000 / 6,000 — the width rule alone from n = 2 w(d) on. The chosen dim is recorded in
``fit_info_["auto"]["dim"]`` (:mod:`oodscope.detectors._fit_size`) and, as for an explicit one, in
``fit_info_["dim"]``.
Needs ``penultimate`` and ``weight`` (``bias`` is used when the backbone gives one, otherwise
zero, i.e. ``u = 0``). ``feature="embedding"`` is allowed when ``weight`` maps embeddings to logits.
Fitting needs more images than ``dim`` (otherwise every fit image lies in P and the residual scale
is rounding noise): an explicit ``dim`` that is not smaller than the fit set is an error that names
the largest usable ``dim``.
"""

from __future__ import annotations

import torch

from oodscope.detectors import _fit_size
from oodscope.detectors import _gaussian as g
from oodscope.detectors._feature_select import FeatureField
from oodscope.detectors.base import Detector, DetectorError, register
from oodscope.detectors.kinds import DetectorKind


def default_dim(width: int) -> int:
    """Principal-subspace dimension used by the ViM authors' benchmark code."""
    if width >= 2048:
        return 1000
    if width >= 768:
        return 512
    return width // 2


@register
class ViM(FeatureField, Detector):
    name = "vim"
    kind = DetectorKind.FEATURE
    requires = ("penultimate", "weight")
    extra_requires = ("weight",)
    optional_fields = ("bias",)
    feature_choices = ("penultimate", "embedding")
    needs_fit = True

    def __init__(self, dim: int | None = None, feature: str = "penultimate") -> None:
        super().__init__()
        self.dim = dim
        self.feature = feature
        self._check_feature(feature)
        if dim is not None and not (isinstance(dim, int) and dim >= 1):
            raise DetectorError(f"{self.name}: dim must be a positive integer or None, got {dim!r}")

    def _head(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x = inputs["x"]
        w = inputs["weight"].to(torch.float64)
        if w.ndim != 2 or w.shape[1] != x.shape[1]:
            raise DetectorError(f"{self.name}: weight must be (C, {x.shape[1]}), got {tuple(w.shape)}")
        b = inputs.get("bias")
        b = (
            torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
            if b is None
            else b.to(torch.float64)
        )
        if b.shape != (w.shape[0],):
            raise DetectorError(f"{self.name}: bias must be ({w.shape[0]},), got {tuple(b.shape)}")
        return w, b

    def _fit(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None) -> None:
        self._record_fields()
        x = g.check_matrix(inputs["x"], self.name)
        w, b = self._head(inputs)
        width = x.shape[1]
        if self.dim is None:
            dim = _fit_size.record(self, "dim", _fit_size.vim_dim(default_dim(width), len(x)))
        else:
            dim = self.dim
        if not 1 <= dim < width:
            raise DetectorError(
                f"{self.name}: dim must be in [1, {width - 1}] for {width}-d features, got {dim}"
            )
        if len(x) <= dim:
            # Every fit image then lies in the principal subspace: residuals are rounding noise and
            # alpha (mean max-logit / mean residual) explodes, so the score would be noise too.
            raise DetectorError(
                f"{self.name}: the principal subspace (dim={dim}) must be smaller than the number of fit "
                f"images ({len(x)}); fit on more than {dim} images or pass dim < {len(x)} (e.g. dim={len(x) // 2}; "
                f"dim=None would choose {_fit_size.vim_dim(default_dim(width), len(x))})"
            )
        u = -(torch.linalg.pinv(w) @ b)
        vals, vecs = torch.linalg.eigh(g.covariance(x, u))
        residual_basis = vecs[:, torch.argsort(vals, descending=True)[dim:]]
        residual_sum = max_logit_sum = 0.0
        for start in range(0, len(x), g.FIT_CHUNK):  # chunks: (N, C) logits of ImageNet do not fit twice
            block = x[start : start + g.FIT_CHUNK].to(torch.float64)
            residual_sum += float(((block - u) @ residual_basis).norm(dim=1).sum())
            max_logit_sum += float((block @ w.T + b).amax(dim=1).sum())
        if not residual_sum > 0:
            raise DetectorError(f"{self.name}: ID features have no residual outside the top {dim} directions")
        self.state_["u"] = u
        self.state_["residual_basis"] = residual_basis
        self.fit_info_["dim"] = int(dim)
        self.fit_info_["alpha"] = max_logit_sum / residual_sum  # = mean max-logit / mean residual

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = inputs["x"].to(torch.float64)
        w, b = self._head(inputs)
        self._check_width(x, self.state_["u"].shape[0])
        residual = ((x - self._state("u", x)) @ self._state("residual_basis", x)).norm(dim=1)
        return self.fit_info_["alpha"] * residual - torch.logsumexp(x @ w.T + b, dim=1)
