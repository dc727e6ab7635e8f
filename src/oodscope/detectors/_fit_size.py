"""Defaults that follow the size of the fit set (``None`` / ``"auto"`` parameters of feature detectors).

The papers' defaults were set on ImageNet / CIFAR-sized fit sets (50,000 to 1.28M images). On a
folder of a hundred images some of them are near chance (KNN's ``k=50``) or cannot be fitted at all
(ViM's 512-d subspace). A parameter whose sensible value depends on the number of fit images
therefore defaults to a *rule of n* that saturates at the paper's value for large fit sets — so a
benchmark on thousands of images gets exactly the paper's default — and an explicit value always
wins. The rules, their sources and their values at n = 100 / 1,000 / 6,000 are tabled in
``docs/fit_size_defaults.md``; each detector's docstring states its own.

Every value a rule chose is recorded at fit time in ``fit_info_[AUTO_KEY]`` (``fit_info_["auto"]``,
e.g. ``{"k": 1}``), which is saved with the detector (for ``oodscope info`` to show). A parameter
given explicitly is never recorded there, and ``get_params()`` keeps returning what was given
(``None`` / ``"auto"``), never the value chosen at fit time.

Symbols: ``n`` = number of fit images (for the neighbour banks: rows kept in the bank after
``subsample``), ``d`` = feature width, ``C`` = classes with at least one fit image.
"""

from __future__ import annotations

from typing import Any

#: The one ``fit_info_`` key under which every detector records the values its rules chose.
AUTO_KEY = "auto"

#: KNN: the paper's CIFAR-10 value (Sun et al., ICML 2022), reached from n = 5,000 bank rows on.
KNN_K_MAX = 50
#: NNGuide: the authors' k (``configs/detector/nnguide.yaml``), reached from n = 1,000 bank rows on.
NNGUIDE_K_MAX = 10
#: Bank rows per neighbour: k grows by one per 100 bank rows. The KNN paper's ratios are 1 / 1,000
#: (CIFAR-10) and 1 / 1,280 (ImageNet); 1 / 100 reaches k = 50 at 5,000 rows, so fit sets of that
#: size and more keep the paper's default exactly.
ROWS_PER_NEIGHBOUR = 100
#: GMM: OpenOOD v1.5 ``gmm.yml`` (50 components, 50 PCA dimensions).
GMM_COMPONENTS_MAX = 50
GMM_PCA_DIM_MAX = 50
#: GMM: fit images per mixture component, on average, at least.
IMAGES_PER_COMPONENT = 10


def neighbours(bank_rows: int, cap: int) -> int:
    """``k = min(cap, max(1, n // 100))`` for a bank of ``n`` rows (KNN: cap 50, NNGuide: cap 10).

    Sun et al. (ICML 2022, ImageNet-1k experiments) scale k with the fraction alpha of the training set
    kept in the bank: k = 1,000 at alpha = 100 % of ImageNet-1k, k = 10 at alpha = 1 %, and k = 50
    on CIFAR-10's 50,000 images.
    """
    return min(int(cap), max(1, int(bank_rows) // ROWS_PER_NEIGHBOUR))


def knn_k(bank_rows: int) -> int:
    """KNN's ``k=None``: ``min(50, max(1, n // 100))``."""
    return neighbours(bank_rows, KNN_K_MAX)


def nnguide_k(bank_rows: int) -> int:
    """NNGuide's ``k=None``: ``min(10, max(1, n // 100))``."""
    return neighbours(bank_rows, NNGUIDE_K_MAX)


def vim_dim(width_rule: int, n: int) -> int:
    """ViM's ``dim=None``: the authors' width rule, kept below the fit set: ``min(width_rule, max(1, n // 2))``.

    With ``dim >= n`` every fit image lies in the principal subspace and the residual scale is
    rounding noise; ``n // 2`` leaves half of the fit images' span to the residual.
    """
    return min(int(width_rule), max(1, int(n) // 2))


def gmm_components(n: int) -> int:
    """GMM's ``n_components=None``: ``min(50, max(1, n // 10))`` — at least 10 fit images per component."""
    return min(GMM_COMPONENTS_MAX, max(1, int(n) // IMAGES_PER_COMPONENT))


def gmm_pca_dim(n: int, components: int) -> int:
    """GMM's ``pca_dim="auto"``: ``min(50, max(1, (n - K) // 2))`` for ``K`` components.

    The tied covariance of ``K`` components estimated from ``n`` images has ``n - K`` degrees of
    freedom; keeping at most half of them as PCA dimensions keeps it well conditioned.
    """
    return min(GMM_PCA_DIM_MAX, max(1, (int(n) - int(components)) // 2))


def covariance_is_singular(n: int, d: int, groups: int = 1) -> bool:
    """A covariance around ``groups`` estimated means of ``n`` rows has rank <= ``n - groups``: below ``d``, singular.

    The Mahalanobis family's ``shrinkage=None`` shrinks exactly then (see
    :func:`oodscope.detectors._gaussian.auto_shrinkage`)."""
    return int(n) - int(groups) < int(d)


def record(detector: Any, name: str, value: Any) -> Any:
    """Record ``value`` as chosen by the rule of parameter ``name`` (``fit_info_["auto"][name]``); returns it."""
    detector.fit_info_.setdefault(AUTO_KEY, {})[name] = value
    return value
