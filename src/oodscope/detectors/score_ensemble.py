"""Score ensemble — a weighted mean of registered detectors' scores, each first put on a common scale.

Score-level fusion of heterogeneous OOD detectors, oodscope's own (no single paper: the standard
late-fusion recipe of standardizing each score on in-distribution data and averaging).

Score: ``sum_m w_m * T_m(s_m(x)) / sum_m w_m`` where ``s_m`` is member m's score (higher = more OOD)
and ``T_m`` an increasing map learned from the member's scores on ID data at fit time:

- ``combination="zscore"`` (default): ``T_m(s) = (s - mean_m) / std_m`` (population std);
- ``combination="rank"``: ``T_m(s) = #{ID scores <= s} / n``, the empirical CDF of the ID scores
  (a calibrated, scale-free "fraction of ID images less OOD than this one").

``members`` is a list of ``(name, params)`` specs, e.g. ``[("knn", {"k": 10}), ("msp", {})]`` (a
bare name means default parameters); ``weights`` (default: equal) are non-negative, one per member.

``fit(features, labels=None, *, text_encoder=None, cache=None, calibration=None)`` (the shared
signature plus the option ``calibration``) fits every member with
:func:`~oodscope.detectors.fitting.fit_detector` (labels go to members that need them,
``text_encoder``/``cache`` to vision-language members), then scores ``calibration`` (default: the
fit features) with every member to learn the ``T_m``. Scoring the fit data itself is biased for
members that memorise it (KNN's nearest neighbour of a bank image is itself): pass held-out ID
features as ``calibration`` when you have them.

Persistence: the members' fitted arrays are stored in this detector's ``state_`` under the prefix
``m<i>.`` and their fit info under ``fit_info_["members"]``; the member specs are in the params.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from oodscope.detectors.base import ArrayLike, Detector, DetectorError, FeatureInput, create, register
from oodscope.detectors.fitting import fit_detector
from oodscope.detectors.kinds import DetectorKind, FitNeeds
from oodscope.text.prompts import TextEmbeddingCache

COMBINATIONS = ("zscore", "rank")


def _spec(item: Any, who: str) -> list:
    """``name`` | ``(name, params)`` | ``{"name": ..., "params": ...}`` -> ``[name, params]``."""
    if isinstance(item, str):
        name, params = item, {}
    elif isinstance(item, dict) and "name" in item:
        name, params = item["name"], item.get("params") or {}
    elif isinstance(item, Sequence) and len(item) == 2:
        name, params = item[0], item[1] or {}
    else:
        raise DetectorError(f"{who}: a member must be a name or a (name, params) pair, got {item!r}")
    if not isinstance(name, str) or not isinstance(params, dict):
        raise DetectorError(f"{who}: a member must be a (name: str, params: dict) pair, got {item!r}")
    try:  # the specs are saved as JSON: store them as they will read back (tuples -> lists)
        params = json.loads(json.dumps(params))
    except (TypeError, ValueError) as err:
        raise DetectorError(f"{who}: parameters of member {name!r} must be JSON-serializable: {err}") from None
    return [name, params]


@register
class ScoreEnsemble(Detector):
    name = "score_ensemble"
    kind = DetectorKind.ENSEMBLE
    needs_fit = True
    fit_options = ("calibration",)

    def __init__(
        self,
        members: Sequence[Any],
        combination: str = "zscore",
        weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(members, str) or not isinstance(members, Sequence) or len(members) == 0:
            raise DetectorError(f"{self.name}: members must be a non-empty list of (name, params) specs")
        self.members = [_spec(m, self.name) for m in members]
        if combination not in COMBINATIONS:
            raise DetectorError(f"{self.name}: combination must be one of {list(COMBINATIONS)}, got {combination!r}")
        self.combination = combination
        if weights is not None:
            weights = [float(w) for w in weights]
            if len(weights) != len(self.members):
                raise DetectorError(f"{self.name}: {len(weights)} weights for {len(self.members)} members")
            if not all(np.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
                raise DetectorError(f"{self.name}: weights must be finite, >= 0 and not all 0")
        self.weights = weights
        self._members = [create(name, **params) for name, params in self.members]
        self._synced_state: dict | None = None

    # What a pipeline must provide: the union of the members' needs.
    def fields(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r for m in self._members for r in m.fields()))

    def fit_needs(self) -> FitNeeds:
        needs = FitNeeds(features=True)
        for member in self._members:
            needs = needs | member.fit_needs()
        return needs

    # ----------------------------------------------------------------- fit
    def fit(
        self,
        features: FeatureInput | None = None,
        labels: ArrayLike | None = None,
        *,
        text_encoder: Any = None,
        cache: TextEmbeddingCache | None = None,
        calibration: FeatureInput | None = None,
    ) -> ScoreEnsemble:
        """Fit the members, then learn each member's score scale on ``calibration`` (default: ``features``)."""
        if features is None:
            raise DetectorError(f"{self.name}: fit needs in-distribution features")
        needs = self.fit_needs()
        if needs.labels and labels is None:
            needy = [n for (n, _), m in zip(self.members, self._members, strict=True) if m.fit_needs().labels]
            raise DetectorError(f"{self.name}: members {needy} need the class labels of the fit features")
        if needs.text_encoder and text_encoder is None:
            raise DetectorError(f"{self.name}: vision-language members need fit(..., text_encoder=backbone)")
        self.state_, self.fit_info_, self.is_fitted_ = {}, {}, False
        for member in self._members:
            fit_detector(member, features, labels, text_encoder=text_encoder, cache=cache)
        reference = self._member_scores(features if calibration is None else calibration)
        if reference.shape[0] == 0:
            raise DetectorError(f"{self.name}: no calibration images to learn the score scales from")
        if self.combination == "zscore":
            mean = reference.mean(dim=0)
            std = reference.std(dim=0, correction=0)
            # Spread at rounding level (e.g. an MSP saturated at -1 on every ID image) would turn
            # rounding noise into large z-scores: treat it as no spread at all.
            flat_mask = ~(std > 1e-7 * mean.abs().clamp_min(1.0))
            flat = [self.members[i][0] for i in torch.nonzero(flat_mask).flatten().tolist()]
            if flat:
                raise DetectorError(
                    f"{self.name}: members {flat} give (nearly) every calibration image the same score, so "
                    "their z-scores are undefined; use more varied ID data or combination='rank'"
                )
            self.state_["ensemble.mean"], self.state_["ensemble.std"] = mean, std
        else:
            self.state_["ensemble.sorted"] = reference.T.sort(dim=1).values.contiguous()  # (M, n)
        for i, member in enumerate(self._members):
            for key, value in member.state_.items():
                self.state_[f"m{i}.{key}"] = value
        self.fit_info_ = {
            "members": [m.fit_info_ for m in self._members],
            "members_fitted": [bool(m.is_fitted_) for m in self._members],
            "num_calibration": int(reference.shape[0]),
        }
        self._synced_state = self.state_
        self.is_fitted_ = True
        return self

    # ----------------------------------------------------------------- score
    def score(self, features: FeatureInput) -> np.ndarray:
        """Weighted mean of the members' standardized scores, float64, higher = more OOD."""
        if not self.is_fitted_:
            raise DetectorError(f"{self.name}: call fit(...) with in-distribution features before score(...)")
        self._sync_members()
        with torch.no_grad():
            return self.combine(self._member_scores(features)).numpy()

    def member_scores(self, features: FeatureInput) -> np.ndarray:
        """Raw scores of every member, (N, M) float64 (after ``fit`` or ``load``)."""
        self._sync_members()
        return self._member_scores(features).numpy()

    def transform(self, scores: torch.Tensor) -> torch.Tensor:
        """Each member's raw scores (N, M) mapped to the common scale learned at fit time."""
        if self.combination == "zscore":
            return (scores - self._state("ensemble.mean", scores)) / self._state("ensemble.std", scores)
        ref = self._state("ensemble.sorted", scores)  # (M, n) sorted ID scores per member
        counts = torch.searchsorted(ref, scores.T.contiguous(), right=True)  # (M, N): #{ref <= s}
        return (counts.to(scores.dtype) / ref.shape[1]).T

    def combine(self, scores: torch.Tensor) -> torch.Tensor:
        """Weighted mean over members of the transformed scores (N,)."""
        weights = torch.ones(scores.shape[1], dtype=scores.dtype)
        if self.weights is not None:
            weights = torch.tensor(self.weights, dtype=scores.dtype)
        return self.transform(scores) @ (weights / weights.sum())

    def _member_scores(self, features: FeatureInput) -> torch.Tensor:
        columns = [torch.from_numpy(np.asarray(m.score(features), dtype=np.float64)) for m in self._members]
        rows = {len(c) for c in columns}
        if len(rows) != 1:
            raise DetectorError(f"{self.name}: members returned different numbers of scores: {sorted(rows)}")
        return torch.stack(columns, dim=1)

    def _sync_members(self) -> None:
        """After ``load`` (which only sets ``state_``/``fit_info_``), hand each member its part."""
        if self._synced_state is self.state_:
            return
        infos = self.fit_info_.get("members")
        fitted = self.fit_info_.get("members_fitted")
        if not isinstance(infos, list) or len(infos) != len(self._members) or len(fitted or []) != len(infos):
            raise DetectorError(f"{self.name}: the saved fit info does not match the {len(self._members)} members")
        for i, member in enumerate(self._members):
            prefix = f"m{i}."
            member.state_ = {k[len(prefix) :]: v for k, v in self.state_.items() if k.startswith(prefix)}
            member.fit_info_ = infos[i]
            member.is_fitted_ = bool(fitted[i])
        self._synced_state = self.state_
