"""Gaussian statistics shared by the Mahalanobis family (and reusable by GDA-style detectors).

Everything is computed in float64 torch on the device of the input, in row chunks so that an
ImageNet-sized feature log never needs a second full-size copy:

- :func:`class_means` / :func:`mean`: per-class and global means.
- :func:`tied_covariance` (within-class scatter / N, the "shared" covariance of Lee et al. 2018 and
  of linear discriminant analysis) and :func:`covariance` (single Gaussian); both are maximum
  likelihood estimates (divide by N), like ``sklearn.covariance.EmpiricalCovariance``.
- :func:`shrink`: optional shrinkage towards a scaled identity (what GDA-style detectors on few
  samples need; 0 = the plain estimate the papers use).
- :func:`ledoit_wolf_shrinkage` / :func:`auto_shrinkage`: the shrinkage that ``shrinkage=None``
  (the Mahalanobis family's default) picks — 0 when the covariance can be full rank
  (``n - groups >= d``), otherwise the Ledoit-Wolf intensity (Ledoit & Wolf, "A well-conditioned
  estimator for large-dimensional covariance matrices", J. Multivariate Analysis 88, 2004; the
  formula of ``sklearn.covariance.ledoit_wolf_shrinkage``) of the rows around their centres.
- :func:`whitener` / :func:`precision`: pseudo-inverse square root and pseudo-inverse of a
  covariance from one symmetric eigendecomposition (``torch.linalg.eigh``). Eigenvalues below
  ``rcond * max_eigenvalue`` are dropped, as ``scipy.linalg.pinvh`` (and therefore sklearn's
  ``precision_``) does, so rank-deficient covariances (dead ReLU units, D > N) are handled.
- :func:`squared_mahalanobis` / :func:`min_squared_mahalanobis`: distances to many centres through
  the whitened space, ``||(x - mu) W||^2`` with ``W W^T = pinv(Sigma)``. Working with ``x W`` rather
  than the quadratic form ``(x - mu)^T P (x - mu)`` per class costs one (N, D) x (D, r) product for
  all classes and cannot go negative.
- :func:`linear_discriminant`: the linear classifier of a shared-covariance Gaussian model.
- :func:`fit_tied_classes`: all of the above for labelled data in one call.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from oodscope.detectors._fit_size import covariance_is_singular
from oodscope.detectors.base import DetectorError

#: Rows per chunk for fit-time reductions (bounds the float64 temporary to ~chunk x D).
FIT_CHUNK = 65536


def _as64(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float64)


def check_matrix(x: torch.Tensor, who: str, what: str = "features") -> torch.Tensor:
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise DetectorError(f"{who}: {what} must be a non-empty (N, D) array, got shape {tuple(x.shape)}")
    return x


def few_samples_caution(n: int, d: int, shrinkage: float, groups: int = 1, auto: bool = False) -> str | None:
    """The caution to record when a covariance is estimated from too few samples to be invertible.

    A covariance around ``groups`` estimated means has rank at most ``n - groups``; below ``d`` it is
    singular: the pseudo-inverse ignores every direction the fit images do not span, so images far
    away along those directions are not "far" at all, and differences of two such distances
    (relative Mahalanobis) can rank far-OOD as the most in-distribution. A shrinkage given
    explicitly (> 0) silences the caution; one chosen by ``shrinkage=None`` (``auto``) does not —
    the estimate still rests on fewer images than dimensions — but the caution then says what was done.
    """
    if not covariance_is_singular(n, d, groups) or (shrinkage > 0 and not auto):
        return None
    if shrinkage > 0:
        return (f"fitted on {n} images of {d}-d features: the covariance is singular, so it was shrunk towards "
                f"a scaled identity (automatic Ledoit-Wolf shrinkage {shrinkage:.3g}); fit on at least "
                f"{d + groups} images for an unshrunk estimate, or set shrinkage explicitly")
    return (f"fitted on {n} images of {d}-d features: the covariance is singular, so directions unseen at "
            f"fit time are ignored; fit on at least {d + groups} images or set shrinkage > 0 (e.g. 0.1)")


def mean(x: torch.Tensor) -> torch.Tensor:
    """Column mean (D,), float64."""
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for start in range(0, len(x), FIT_CHUNK):
        total += _as64(x[start : start + FIT_CHUNK]).sum(dim=0)
    return total / len(x)


def class_means(
    x: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class means (C, D) float64 and counts (C,) int64 for labels in ``[0, C)``.

    Classes without samples get a zero row and a zero count; callers decide what that means.
    """
    if labels.ndim != 1 or len(labels) != len(x):
        raise DetectorError("labels must be 1-D with one label per feature row")
    if len(labels) and int(labels.min()) < 0:
        raise DetectorError("labels must be non-negative class indices")
    c = int(num_classes) if num_classes is not None else int(labels.max()) + 1
    if len(labels) and int(labels.max()) >= c:
        raise DetectorError(f"labels go up to {int(labels.max())} but there are only {c} classes")
    labels = labels.to(device=x.device, dtype=torch.long)
    sums = torch.zeros(c, x.shape[1], dtype=torch.float64, device=x.device)
    for start in range(0, len(x), FIT_CHUNK):
        sums.index_add_(0, labels[start : start + FIT_CHUNK], _as64(x[start : start + FIT_CHUNK]))
    counts = torch.bincount(labels, minlength=c)
    means = sums / counts.clamp_min(1).to(torch.float64)[:, None]
    return means, counts


def _scatter(x: torch.Tensor, centres: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """Sum over rows of ``(x_i - centre_i)(x_i - centre_i)^T`` with centre_i = centres[index_i]."""
    d = x.shape[1]
    s = torch.zeros(d, d, dtype=torch.float64, device=x.device)
    for start in range(0, len(x), FIT_CHUNK):
        block = _as64(x[start : start + FIT_CHUNK])
        if index is None:
            block = block - centres
        else:
            block = block - centres[index[start : start + FIT_CHUNK]]
        s += block.T @ block
    return (s + s.T) / 2  # exact symmetry for eigh


def covariance(x: torch.Tensor, centre: torch.Tensor | None = None) -> torch.Tensor:
    """Maximum-likelihood covariance around ``centre`` (default: the mean), (D, D) float64.

    Passing a centre other than the mean gives the second-moment matrix around that point (ViM's
    ``EmpiricalCovariance(assume_centered=True)`` on ``x - u``).
    """
    centre = mean(x) if centre is None else _as64(centre).to(x.device)
    return _scatter(x, centre, None) / len(x)


def tied_covariance(x: torch.Tensor, labels: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Shared within-class covariance ``1/N sum_c sum_{i in c} (x_i - mu_c)(x_i - mu_c)^T``."""
    labels = labels.to(device=x.device, dtype=torch.long)
    return _scatter(x, _as64(means).to(x.device), labels) / len(x)


def shrink(cov: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """``(1 - s) * cov + s * (trace(cov) / D) * I`` (sklearn's ``shrunk_covariance`` rule)."""
    if not 0.0 <= shrinkage <= 1.0:
        raise DetectorError(f"shrinkage must be in [0, 1], got {shrinkage}")
    if shrinkage == 0.0:
        return cov
    d = cov.shape[0]
    target = torch.trace(cov) / d
    return (1.0 - shrinkage) * cov + shrinkage * target * torch.eye(d, dtype=cov.dtype, device=cov.device)


def _fourth_moment(x: torch.Tensor, centres: torch.Tensor, index: torch.Tensor | None) -> float:
    """``sum_i ||x_i - centre_i||^4`` (centre_i = centres[index_i], or the one centre), in row chunks."""
    total = 0.0
    for start in range(0, len(x), FIT_CHUNK):
        block = _as64(x[start : start + FIT_CHUNK])
        block = block - (centres if index is None else centres[index[start : start + FIT_CHUNK]])
        total += float(((block * block).sum(dim=1) ** 2).sum())
    return total


def ledoit_wolf_shrinkage(cov: torch.Tensor, fourth_moment: float, n: int) -> float:
    """Ledoit-Wolf shrinkage intensity of the ML covariance ``cov`` of ``n`` centred rows.

    ``fourth_moment`` is ``sum_i ||x_i||^4`` over those rows. Same formula as
    ``sklearn.covariance.ledoit_wolf_shrinkage(x, assume_centered=True)`` — with ``mu = tr(S) / d``:
    ``beta = (sum_i ||x_i||^4 / n - ||S||_F^2) / (n d)``, ``delta = (||S||_F^2 - d mu^2) / d``,
    intensity ``min(beta, delta) / delta`` (0 when that is 0) — for the convex combination of
    :func:`shrink`. Computed from the (D, D) matrix and the row norms, so no (N, D) copy is kept.
    """
    cov = _as64(cov)
    d = cov.shape[0]
    if d == 1 or n < 1:
        return 0.0
    mu = float(torch.trace(cov)) / d
    frob = float((cov * cov).sum())
    beta = (fourth_moment / n - frob) / (n * d)
    delta = (frob - d * mu * mu) / d
    beta = min(beta, delta)
    if beta <= 0 or delta <= 0:
        return 0.0
    return float(min(1.0, beta / delta))


def auto_shrinkage(
    x: torch.Tensor, cov: torch.Tensor, centres: torch.Tensor, index: torch.Tensor | None = None, groups: int = 1
) -> float:
    """``shrinkage=None``: 0 when ``cov`` (around ``groups`` estimated centres) can be full rank, i.e.
    ``n - groups >= d``; otherwise the Ledoit-Wolf intensity of the rows around their centres."""
    n, d = x.shape
    if not covariance_is_singular(n, d, groups):
        return 0.0
    centres = _as64(centres).to(x.device)
    if index is not None:
        index = index.to(device=x.device, dtype=torch.long)
    return ledoit_wolf_shrinkage(cov, _fourth_moment(x, centres, index), n)


def _eigh_kept(cov: torch.Tensor, rcond: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    cov = _as64(cov)
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise DetectorError(f"covariance must be square, got shape {tuple(cov.shape)}")
    vals, vecs = torch.linalg.eigh((cov + cov.T) / 2)
    top = float(vals.max()) if vals.numel() else 0.0
    if not top > 0:
        raise DetectorError("within-class covariance is zero (identical features, or one image per class)")
    # scipy.linalg.pinvh default: rtol = max(M, N) * eps.
    cutoff = (rcond if rcond is not None else cov.shape[0] * torch.finfo(torch.float64).eps) * top
    keep = vals > cutoff
    return vals[keep], vecs[:, keep]


def whitener(cov: torch.Tensor, rcond: float | None = None) -> torch.Tensor:
    """(D, r) matrix ``W = U diag(lambda^-1/2)`` over the kept eigenpairs: ``W W^T = pinv(cov)``."""
    vals, vecs = _eigh_kept(cov, rcond)
    return vecs / vals.sqrt()[None, :]


def precision(cov: torch.Tensor, rcond: float | None = None) -> torch.Tensor:
    """Pseudo-inverse of a covariance (D, D), symmetric by construction."""
    w = whitener(cov, rcond)
    return w @ w.T


def pseudo_log_det(cov: torch.Tensor, rcond: float | None = None) -> torch.Tensor:
    """Log pseudo-determinant (sum of the logs of the kept eigenvalues), for Gaussian log-densities."""
    vals, _ = _eigh_kept(cov, rcond)
    return vals.log().sum()


def squared_mahalanobis(x: torch.Tensor, centres: torch.Tensor, whiten: torch.Tensor) -> torch.Tensor:
    """(N, K) squared Mahalanobis distances of rows of ``x`` to ``centres`` (K, D), in float64."""
    whiten = _as64(whiten).to(x.device)
    xw = _as64(x) @ whiten
    cw = _as64(centres).to(x.device) @ whiten
    d2 = (xw * xw).sum(dim=1, keepdim=True) + (cw * cw).sum(dim=1)[None, :] - 2.0 * (xw @ cw.T)
    return d2.clamp_min(0.0)


def min_squared_mahalanobis(
    x: torch.Tensor, centres: torch.Tensor, whiten: torch.Tensor, chunk: int = 8192
) -> torch.Tensor:
    """(N,) minimum over centres of the squared distance, in row chunks (N x K never materialised)."""
    out = [
        squared_mahalanobis(x[s : s + chunk], centres, whiten).amin(dim=1) for s in range(0, len(x), chunk)
    ]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64, device=x.device)


def gaussian_log_density(
    x: torch.Tensor, centres: torch.Tensor, whiten: torch.Tensor, log_det: torch.Tensor
) -> torch.Tensor:
    """(N, K) log N(x | mu_k, Sigma) for a shared covariance given by its whitener and log-det.

    With a rank-deficient covariance this is the density on the kept subspace (dimension r).
    """
    r = whiten.shape[1]
    d2 = squared_mahalanobis(x, centres, whiten)
    return -0.5 * (d2 + r * math.log(2.0 * math.pi) + _as64(log_det).to(x.device))


def linear_discriminant(
    means: torch.Tensor, prec: torch.Tensor, log_priors: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (C, D) and biases (C,) of the shared-covariance Gaussian classifier.

    ``log p(c | x) = x . w_c + b_c + const`` with ``w_c = P mu_c`` and
    ``b_c = -1/2 mu_c^T P mu_c + log pi_c`` (uniform priors when ``log_priors`` is None).
    """
    means = _as64(means)
    prec = _as64(prec).to(means.device)
    w = means @ prec  # P is symmetric
    b = -0.5 * (w * means).sum(dim=1)
    if log_priors is not None:
        b = b + _as64(log_priors).to(means.device)
    return w, b


class TiedGaussians(NamedTuple):
    """Class-conditional Gaussians with one shared covariance, fitted on labelled features."""

    means: torch.Tensor  # (K, D) means of the K classes that have samples
    class_ids: torch.Tensor  # (K,) their label values
    counts: torch.Tensor  # (K,) samples per class
    covariance: torch.Tensor  # (D, D) tied covariance, after shrinkage
    whitener: torch.Tensor  # (D, r) with W W^T = pinv(covariance)
    shrinkage: float = 0.0  # the shrinkage applied (chosen by auto_shrinkage when None was asked for)


def fit_tied_classes(
    x: torch.Tensor, labels: torch.Tensor, shrinkage: float | None = 0.0, rcond: float | None = None
) -> TiedGaussians:
    """Means of the classes present in ``labels`` and their shared within-class covariance.

    ``shrinkage=None`` picks it with :func:`auto_shrinkage` (0 unless ``n - classes < d``)."""
    all_means, counts = class_means(x, labels)
    present = counts > 0
    cov = tied_covariance(x, labels, all_means)
    if shrinkage is None:
        shrinkage = auto_shrinkage(x, cov, all_means, labels, int(present.sum()))
    cov = shrink(cov, shrinkage)
    return TiedGaussians(
        means=all_means[present],
        class_ids=torch.nonzero(present).flatten(),
        counts=counts[present],
        covariance=cov,
        whitener=whitener(cov, rcond),
        shrinkage=float(shrinkage),
    )
