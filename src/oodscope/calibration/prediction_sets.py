"""Split-conformal prediction sets over the ID classes.

Given class probabilities (or logits) and labels of a calibration set held out from training, every
method defines a non-conformity score ``s(x, y)`` (higher = label y fits x worse); the set for a new
x is ``{y : s(x, y) <= qhat}`` with ``qhat`` the ``ceil((n + 1)(1 - alpha))``-th smallest calibration
score (equivalently the empirical quantile at level ``ceil((n + 1)(1 - alpha)) / n``). For a test
point exchangeable with the calibration set, ``P(y in set) >= 1 - alpha`` (marginal coverage,
Vovk et al. 2005).

Scores (``o(y)`` = 1-based rank of y when the probabilities are sorted in decreasing order, ties
broken by class index; ``rho(y)`` = total probability of the labels ranked before y):

* ``"lac"`` — Sadinle, Lei & Wasserman, "Least Ambiguous Set-Valued Classifiers with Bounded Error
  Levels", JASA 2019: ``s = 1 - p_y``.
* ``"aps"`` — Romano, Sesia & Candès, "Classification with Valid and Adaptive Coverage", NeurIPS
  2020: ``s = rho(y) + u * p_y`` with ``u ~ U(0, 1)`` (``randomized=True``, default) or ``u = 1``.
* ``"raps"`` — Angelopoulos, Bates, Malik & Jordan, "Uncertainty Sets for Image Classifiers using
  Conformal Prediction", ICLR 2021: ``s = rho(y) + u * p_y + lam * max(0, o(y) - k_reg)``. Defaults
  ``lam = 0.01, k_reg = 5`` are the values the authors' code release uses as its example
  (``ConformalModel(..., kreg=5, lamda=0.01)``); the paper itself tunes both on held-out data.
* ``"evidential"`` (alias ``"ecp"``) — Karimi & Samavi, "Evidential Uncertainty Sets in Deep
  Classifiers Using Conformal Prediction", COPA 2024 (PMLR 230), Eqs. (1)-(11). From logits z:
  evidence ``e = A(z)`` (``A`` = ReLU by default, the paper's example), ``alpha_k = e_k + 1``,
  ``p_k = alpha_k / sum(alpha)``, ``u = K / sum(alpha)``, base rate ``pi_k = 1 / K``, utility
  ``phi = softmax(z)``, rank ``r_k`` in {0..K-1} of ``p_k`` (decreasing; equal ``p_k``, e.g. all
  classes with zero ReLU evidence, are ordered by their logit, a convention the paper leaves open), and

      C_k = K u * (-pi_k log p_k) / (phi_k p_k^2 (K - r_k))      (Eq. 10)
      s(x, k) = C_k / max_v C_v                                    (Eq. 11)

  With uniform base rates the factors K u cancel in Eq. 11; they are kept for fidelity. Requires
  logits (``from_logits=True``, the default for this method).
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import numpy as np

from oodscope.calibration.threshold import conformal_rank

__all__ = ["PredictionSetCalibrator", "METHODS", "softmax"]

METHODS = ("lac", "aps", "raps", "evidential")
_ALIASES = {"ecp": "evidential"}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "lac": {},
    "aps": {"randomized": True, "seed": 0},
    "raps": {"lam": 0.01, "k_reg": 5, "randomized": True, "seed": 0},
    "evidential": {"evidence": "relu"},
}
_EVIDENCE = {
    "relu": lambda z: np.maximum(z, 0.0),
    "softplus": lambda z: np.logaddexp(0.0, z),
    "exp": lambda z: np.exp(np.clip(z, -50.0, 50.0)),
}


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    ez = np.exp(z)
    return ez / ez.sum(axis=1, keepdims=True)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _ranks_desc(p: np.ndarray, tiebreak: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Order (class indices by decreasing p, then decreasing ``tiebreak``, then index) and the
    0-based rank of every class."""
    if tiebreak is None:
        order = np.argsort(-p, axis=1, kind="stable")
    else:
        order = np.lexsort((-tiebreak, -p), axis=1)  # last key is primary; lexsort is stable
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(p.shape[1])[None, :].repeat(p.shape[0], 0), axis=1)
    return order, ranks


def evidential_cost(logits: np.ndarray, evidence: str = "relu") -> np.ndarray:
    """Evidential classification cost C_k of Karimi & Samavi (2024), Eq. (10), shape (N, K)."""
    return np.exp(_log_evidential_cost(_as_matrix(logits, "logits"), evidence))


def _log_evidential_cost(logits: np.ndarray, evidence: str) -> np.ndarray:
    if evidence not in _EVIDENCE:
        raise ValueError(f"evidence must be one of {tuple(_EVIDENCE)}, got {evidence!r}")
    k = logits.shape[1]
    e = _EVIDENCE[evidence](logits)
    alpha = e + 1.0  # Eq. (1) with base rate 1 / K
    strength = alpha.sum(axis=1, keepdims=True)
    p = alpha / strength  # Eq. (2)
    u = k / strength  # Eq. (3)
    # Classes with zero ReLU evidence share the same p; the paper leaves their ranks unspecified.
    # Breaking the tie by the logit keeps the score strictly decreasing in the logit.
    _, r = _ranks_desc(p, tiebreak=logits)
    # -log p_k = log(1 + (sum_{j != k} alpha_j) / alpha_k): stays accurate when p_k is close to 1.
    neg_log_p = np.log1p((strength - alpha) / alpha)
    # Logs throughout because phi_k = softmax underflows to 0 for very negative logits.
    return (
        np.log(k * u)
        + np.log(1.0 / k)
        + np.log(neg_log_p)
        - _log_softmax(logits)
        - 2.0 * np.log(p)
        - np.log(k - r)
    )


def _as_matrix(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] < 2:
        raise ValueError(f"{name} must be (N, K) with N >= 1 and K >= 2, got shape {arr.shape}")
    bad = ~np.isfinite(arr)
    if bad.any():
        raise ValueError(f"{name} contain {int(bad.sum())} non-finite value(s)")
    return arr


#: A generator, or one uniform in [0, 1) per row.
Randomness = np.random.Generator | np.ndarray | None


def _uniforms(rng: np.random.Generator | np.ndarray, n: int) -> np.ndarray:
    if isinstance(rng, np.random.Generator):
        return rng.uniform(size=(n, 1))
    u = np.asarray(rng, dtype=np.float64).reshape(-1)
    if u.shape != (n,) or not ((u >= 0) & (u < 1)).all():
        raise ValueError(f"expected a generator or {n} uniforms in [0, 1), got shape {u.shape}")
    return u.reshape(n, 1)


class PredictionSetCalibrator:
    """Conformal prediction sets: ``fit`` on held-out (probabilities or logits, labels), then
    ``predict_sets`` returns an (N, K) boolean mask.

    Args:
        method: "lac", "aps", "raps" or "evidential" (alias "ecp").
        alpha: miscoverage level; sets contain the true label with probability >= 1 - alpha.
        from_logits: inputs are logits (softmax is applied for lac/aps/raps). Defaults to False,
            except for "evidential", which needs logits.
        **params: method parameters — aps: ``randomized`` (True), ``seed`` (0); raps: ``lam`` (0.01),
            ``k_reg`` (5), ``randomized`` (True), ``seed`` (0); evidential: ``evidence``
            ("relu" | "softplus" | "exp", default "relu").
    """

    def __init__(
        self, method: str = "aps", alpha: float = 0.1, *, from_logits: bool | None = None, **params: Any
    ) -> None:
        method = _ALIASES.get(method, method)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS} (or 'ecp'), got {method!r}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        unknown = set(params) - set(_DEFAULTS[method])
        if unknown:
            raise TypeError(f"unknown parameter(s) for {method}: {sorted(unknown)}")
        if from_logits is None:
            from_logits = method == "evidential"
        if method == "evidential" and not from_logits:
            raise ValueError("the evidential score is defined on logits: pass logits with from_logits=True")
        self.method = method
        self.alpha = float(alpha)
        self.from_logits = bool(from_logits)
        self.params: dict[str, Any] = {**_DEFAULTS[method], **params}
        if method == "raps" and (self.params["lam"] < 0 or int(self.params["k_reg"]) < 0):
            raise ValueError("raps needs lam >= 0 and k_reg >= 0")
        if method == "evidential" and self.params["evidence"] not in _EVIDENCE:
            raise ValueError(f"evidence must be one of {tuple(_EVIDENCE)}")
        self.qhat_: float | None = None
        self.n_: int | None = None
        self._rng = np.random.default_rng(self.params.get("seed"))

    # -- scores ------------------------------------------------------------------------------------
    def _probs(self, x: Any) -> np.ndarray:
        arr = _as_matrix(x, "logits" if self.from_logits else "probabilities")
        if self.from_logits:
            return arr
        row = arr.sum(axis=1)
        if (arr < 0).any() or not np.allclose(row, 1.0, atol=1e-4):
            raise ValueError(
                "probabilities must be non-negative and sum to 1 per row; pass from_logits=True for logits"
            )
        return arr

    def score_matrix(self, x: Any, rng: Randomness = None) -> np.ndarray:
        """Non-conformity score of every label, shape (N, K). Randomized methods draw one u per row.

        ``rng``: a generator (default: the calibrator's own, seeded), or the N uniforms themselves —
        e.g. :func:`oodscope.calibration.split.content_uniforms`, so that an image gets the same
        ``u`` at calibration and at test time."""
        a = self._probs(x)
        if self.method == "evidential":
            log_c = _log_evidential_cost(a, self.params["evidence"])
            return np.exp(log_c - log_c.max(axis=1, keepdims=True))  # Eq. (11)
        p = softmax(a) if self.from_logits else a
        if self.method == "lac":
            return 1.0 - p
        order, ranks = _ranks_desc(p)
        p_sorted = np.take_along_axis(p, order, axis=1)
        before_sorted = np.cumsum(p_sorted, axis=1) - p_sorted  # rho: mass ranked strictly before
        rho = np.take_along_axis(before_sorted, ranks, axis=1)
        if self.params["randomized"]:
            u = _uniforms(self._rng if rng is None else rng, p.shape[0])
        else:
            u = np.ones((p.shape[0], 1))
        s = rho + u * p
        if self.method == "raps":
            s = s + self.params["lam"] * np.maximum(0, ranks + 1 - int(self.params["k_reg"]))
        return s

    def scores(self, x: Any, labels: Any, rng: Randomness = None) -> np.ndarray:
        """Non-conformity score of the given labels, shape (N,)."""
        y = np.asarray(labels)
        s = self.score_matrix(x, rng)
        if y.shape != (s.shape[0],) or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"labels must be (N,) integers with N={s.shape[0]}, got {y.shape} {y.dtype}")
        if (y < 0).any() or (y >= s.shape[1]).any():
            raise ValueError(f"labels must be in [0, {s.shape[1]})")
        return s[np.arange(s.shape[0]), y]

    # -- calibration -------------------------------------------------------------------------------
    def fit(self, probs_or_logits: Any, labels: Any, rng: Randomness = None) -> PredictionSetCalibrator:
        """Calibrate on held-out data (not the data the classifier was trained on); ``rng`` as in
        :meth:`score_matrix`."""
        cal = np.sort(self.scores(probs_or_logits, labels, rng))
        n = int(cal.size)
        k = conformal_rank(n, 1 - Fraction(repr(self.alpha)))
        self.qhat_ = float(cal[k - 1])
        self.n_ = n
        return self

    def predict_sets(self, probs_or_logits: Any, rng: Randomness = None) -> np.ndarray:
        """Boolean (N, K) mask: True where the label is in the prediction set (sets may be empty)."""
        if self.qhat_ is None:
            raise RuntimeError("call fit() before predict_sets()")
        return self.score_matrix(probs_or_logits, rng) <= self.qhat_

    # -- persistence -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "alpha": self.alpha,
            "from_logits": self.from_logits,
            "params": dict(self.params),
            "qhat": self.qhat_,
            "n": self.n_,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PredictionSetCalibrator:
        obj = cls(d["method"], d["alpha"], from_logits=d["from_logits"], **d["params"])
        obj.qhat_ = None if d["qhat"] is None else float(d["qhat"])
        obj.n_ = None if d["n"] is None else int(d["n"])
        return obj
