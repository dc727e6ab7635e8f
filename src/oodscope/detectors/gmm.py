"""GMM — negative log-likelihood under a Gaussian mixture fitted to ID features.

A class-agnostic density baseline, as in OpenOOD's ``gmm`` postprocessor (Yang, Wang, Zou, Zhou et
al., "OpenOOD: Benchmarking Generalized Out-of-Distribution Detection", NeurIPS 2022 Datasets and
Benchmarks; kept in OpenOOD v1.5). It is the unsupervised counterpart of the class-conditional
Gaussians of Lee et al. (NeurIPS 2018).

Score: ``-log sum_k pi_k N(P^T (x - m) | mu_k, Sigma_k)`` where ``P`` projects on the top
``pca_dim`` principal components of the ID features (mean ``m``), or the identity when
``pca_dim=None``. The full normalised density is used (OpenOOD drops the constant
``-1/2 log|2 pi Sigma|``, which is the same for every input when the covariance is tied).
Defaults, from OpenOOD v1.5 ``gmm.yml`` (its last-layer entry, the only one with non-zero
weight): 50 components, ``covariance_type="tied"``, 50 PCA dimensions, ``seed=0``
(``random_state=0``); ``max_iter=100`` and ``reg_covar=1e-6`` are scikit-learn's defaults. The
component count and the PCA dimension follow the number of fit images ``n`` and reach OpenOOD's 50
from n = 500 on:

- ``n_components=None``: ``K = min(50, max(1, n // 10))`` — at least 10 fit images per component on
  average (OpenOOD's 50 components on CIFAR-10's 50,000 images have 1,000 each);
- ``pca_dim="auto"``: ``min(50, max(1, (n - K) // 2))`` — the tied covariance of ``K`` components
  has ``n - K`` degrees of freedom, half of which at most become PCA dimensions, so it stays well
  conditioned. ``pca_dim=None`` still means no PCA, and a value >= the feature width works as no
  PCA too.

So K = 10 / 50 / 50 and pca_dim = 45 / 50 / 50 at n = 100 / 1,000 / 6,000. The chosen values are
recorded in ``fit_info_["auto"]`` (``"n_components"``, ``"pca_dim"``; see
:mod:`oodscope.detectors._fit_size`); explicit values always win and are not recorded there.
EM is run by ``sklearn.mixture.GaussianMixture``; only its arrays are kept (means, weights, Cholesky
factors of the precisions) and the density is evaluated here in torch, so nothing is pickled.
``feature="auto"``: ``penultimate`` when present, else ``embedding``.
"""

from __future__ import annotations

import math

import torch

from oodscope.detectors import _fit_size
from oodscope.detectors import _gaussian as g
from oodscope.detectors._feature_select import FeatureField
from oodscope.detectors.base import Detector, DetectorError, register
from oodscope.detectors.kinds import DetectorKind

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")


def mixture_log_likelihood(
    z: torch.Tensor, means: torch.Tensor, weights: torch.Tensor, prec_chol: torch.Tensor, covariance_type: str
) -> torch.Tensor:
    """(N,) ``log sum_k w_k N(z | mu_k, Sigma_k)`` from sklearn-layout precision Cholesky factors.

    Layouts (as ``GaussianMixture.precisions_cholesky_``): full (K, d, d), tied (d, d),
    diag (K, d), spherical (K,). Components are visited one at a time so the temporary stays
    (N, d) rather than (N, K, d).
    """
    d = z.shape[1]
    if covariance_type == "tied":
        zt = z @ prec_chol
        log_det_tied = torch.diagonal(prec_chol).log().sum()
    columns = []
    for k in range(len(means)):
        if covariance_type == "full":
            y = (z - means[k]) @ prec_chol[k]
            log_det = torch.diagonal(prec_chol[k]).log().sum()
        elif covariance_type == "tied":
            y = zt - means[k] @ prec_chol
            log_det = log_det_tied
        elif covariance_type == "diag":
            y = (z - means[k]) * prec_chol[k]
            log_det = prec_chol[k].log().sum()
        else:
            y = (z - means[k]) * prec_chol[k]
            log_det = d * prec_chol[k].log()
        columns.append(-0.5 * (d * math.log(2.0 * math.pi) + (y * y).sum(dim=1)) + log_det + weights[k].log())
    return torch.logsumexp(torch.stack(columns, dim=1), dim=1)


@register
class GMM(FeatureField, Detector):
    name = "gmm"
    kind = DetectorKind.FEATURE
    requires = ("embedding",)
    needs_fit = True

    def __init__(
        self,
        n_components: int | None = None,
        covariance_type: str = "tied",
        pca_dim: int | str | None = "auto",
        feature: str = "auto",
        seed: int = 0,
        max_iter: int = 100,
        reg_covar: float = 1e-6,
    ) -> None:
        super().__init__()
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.pca_dim = pca_dim
        self.feature = feature
        self.seed = seed
        self.max_iter = max_iter
        self.reg_covar = reg_covar
        self._check_feature(feature)
        if n_components is not None and not (isinstance(n_components, int) and n_components >= 1):
            raise DetectorError(
                f"{self.name}: n_components must be a positive integer or None (a rule of the fit-set size), "
                f"got {n_components!r}"
            )
        if covariance_type not in COVARIANCE_TYPES:
            raise DetectorError(f"{self.name}: covariance_type must be one of {list(COVARIANCE_TYPES)}")
        if pca_dim not in (None, "auto") and not (isinstance(pca_dim, int) and pca_dim >= 1):
            raise DetectorError(
                f"{self.name}: pca_dim must be a positive integer, None (no PCA) or 'auto' (a rule of the "
                f"fit-set size), got {pca_dim!r}"
            )

    def _fit(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None) -> None:
        from sklearn.mixture import GaussianMixture

        self._record_fields()
        x = g.check_matrix(inputs["x"], self.name)
        n = len(x)
        if self.n_components is None:
            components = _fit_size.record(self, "n_components", _fit_size.gmm_components(n))
        else:
            components = self.n_components
        if n < components:
            raise DetectorError(f"{self.name}: {n} ID features for {components} components")
        if self.pca_dim == "auto":
            pca_dim = _fit_size.record(self, "pca_dim", _fit_size.gmm_pca_dim(n, components))
        else:
            pca_dim = self.pca_dim
        centre = g.mean(x)
        if pca_dim is not None and pca_dim < x.shape[1]:
            vals, vecs = torch.linalg.eigh(g.covariance(x, centre))
            projection = vecs[:, torch.argsort(vals, descending=True)[:pca_dim]]
        else:
            projection = torch.eye(x.shape[1], dtype=torch.float64, device=x.device)
        z = (
            torch.cat(
                [
                    (x[s : s + g.FIT_CHUNK].to(torch.float64) - centre) @ projection
                    for s in range(0, len(x), g.FIT_CHUNK)
                ]
            )
            .cpu()
            .numpy()
        )
        gm = GaussianMixture(
            n_components=components,
            covariance_type=self.covariance_type,
            random_state=self.seed,
            max_iter=self.max_iter,
            reg_covar=self.reg_covar,
        ).fit(z)
        self.state_["centre"] = centre
        self.state_["projection"] = projection
        self.state_["means"] = torch.from_numpy(gm.means_)
        self.state_["weights"] = torch.from_numpy(gm.weights_)
        self.state_["precisions_cholesky"] = torch.from_numpy(gm.precisions_cholesky_)
        self.fit_info_["converged"] = bool(gm.converged_)
        self.fit_info_["n_iter"] = int(gm.n_iter_)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """The (float64) coordinates the mixture lives in: ``(x - m) @ P``."""
        x = x.to(torch.float64)
        return (x - self._state("centre", x)) @ self._state("projection", x)

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = inputs["x"]
        self._check_width(x, self.state_["centre"].shape[0])
        z = self.transform(x)
        return -mixture_log_likelihood(
            z,
            self._state("means", z),
            self._state("weights", z),
            self._state("precisions_cholesky", z),
            self.covariance_type,
        )
