"""What :meth:`OODModel.predict` returns: one row per input image, plus the same data as arrays."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from oodscope.calibration import benjamini_hochberg


@dataclass(frozen=True)
class PredictionRow:
    """The decision for one image.

    ``ood``: the conformal p-value is ``<= alpha`` (equivalently ``score > threshold``).
    ``ood_fdr``: flagged by Benjamini-Hochberg at level ``fdr`` over the whole batch (only when asked).
    ``predicted_class`` / ``class_probability``: the class head's arg-max, filled for every scored
    image (also flagged ones: it says what the image would be if it were ID).
    ``prediction_set``: the conformal set of ID classes; **empty when the image is flagged OOD**
    (``ood`` is True) — no ID label is vouched for an image the model rejects. It can also be empty
    for an accepted image (randomized APS / LAC allow empty sets). ``None`` when the model has no
    calibrated prediction sets.
    ``error``: why the image could not be scored (unreadable file, ...); every other field is None.
    A model that is not calibrated gives scores (and classes) only: ``p_value`` and ``ood`` are None.
    """

    item_id: str
    score: float | None
    p_value: float | None
    ood: bool | None
    predicted_class: str | None = None
    class_probability: float | None = None
    prediction_set: list[str] | None = None
    error: str | None = None
    ood_fdr: bool | None = None

    def to_dict(self, include_fdr: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "item": self.item_id,
            "score": self.score,
            "p_value": self.p_value,
            "ood": self.ood,
        }
        if include_fdr:
            out["ood_fdr"] = self.ood_fdr
        out.update(predicted_class=self.predicted_class, class_probability=self.class_probability,
                   prediction_set=self.prediction_set, error=self.error)
        return out


def _opt_float(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


@dataclass
class Predictions:
    """Predictions for a batch of images, in input order (rows that failed keep their place).

    Arrays (length N): ``scores`` and ``p_values`` (NaN where ``errors[i]`` is set), ``ood`` (bool,
    False where an error occurred: check ``ok``), ``probabilities`` (N, K) and ``set_mask`` (N, K)
    — the conformal prediction set *before* the OOD rule — when the model has them.
    """

    item_ids: list[str]
    scores: np.ndarray
    p_values: np.ndarray
    ood: np.ndarray
    errors: list[str | None]
    alpha: float
    class_names: list[str] | None = None
    probabilities: np.ndarray | None = None
    set_mask: np.ndarray | None = None
    ood_fdr: np.ndarray | None = None
    fdr: float | None = None
    #: False for a model without calibration: scores only (p-values and decisions are None).
    calibrated: bool = True
    _rows: list[PredictionRow] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def ok(self) -> np.ndarray:
        """True where the image was scored."""
        return np.array([e is None for e in self.errors], dtype=bool)

    @property
    def failures(self) -> list[tuple[str, str]]:
        return [(i, e) for i, e in zip(self.item_ids, self.errors, strict=True) if e is not None]

    @property
    def predicted_index(self) -> np.ndarray | None:
        """Arg-max class index per image (-1 where an error occurred), or None without a head."""
        if self.probabilities is None:
            return None
        out = np.full(len(self), -1, dtype=np.int64)
        ok = self.ok
        if ok.any():
            out[ok] = self.probabilities[ok].argmax(axis=1)
        return out

    # ------------------------------------------------------------------ rows
    def rows(self) -> list[PredictionRow]:
        if self._rows is None:
            self._rows = [self._row(i) for i in range(len(self))]
        return self._rows

    def _row(self, i: int) -> PredictionRow:
        if self.errors[i] is not None:
            return PredictionRow(self.item_ids[i], None, None, None, error=self.errors[i])
        predicted = probability = None
        if self.probabilities is not None and self.class_names is not None:
            k = int(self.probabilities[i].argmax())
            predicted, probability = self.class_names[k], float(self.probabilities[i, k])
        members = None
        ood = bool(self.ood[i]) if self.calibrated else None
        if self.set_mask is not None and self.class_names is not None:
            members = [] if ood else [c for c, m in zip(self.class_names, self.set_mask[i], strict=True) if m]
        return PredictionRow(
            item_id=self.item_ids[i],
            score=_opt_float(self.scores[i]),
            p_value=_opt_float(self.p_values[i]) if self.calibrated else None,
            ood=ood,
            predicted_class=predicted,
            class_probability=probability,
            prediction_set=members,
            ood_fdr=None if self.ood_fdr is None else bool(self.ood_fdr[i]),
        )

    def __iter__(self) -> Iterator[PredictionRow]:
        return iter(self.rows())

    def __getitem__(self, i: int) -> PredictionRow:
        return self.rows()[i]

    def to_dicts(self) -> list[dict[str, Any]]:
        return [r.to_dict(include_fdr=self.fdr is not None) for r in self.rows()]

    # ------------------------------------------------------------------ batch operations
    def with_fdr(self, q: float) -> Predictions:
        """Benjamini-Hochberg at level ``q`` over every scored image of this batch (``ood_fdr``).

        Conformal p-values against one calibration set are PRDS (Bates et al. 2023), so the expected
        fraction of ID images among the flagged ones is at most ``q * (#ID / #scored)``.
        """
        if not self.calibrated:
            raise ValueError("Benjamini-Hochberg needs p-values: the model is not calibrated")
        ok = self.ok
        flags = np.zeros(len(self), dtype=bool)
        if ok.any():
            flags[ok] = benjamini_hochberg(self.p_values[ok], q)
        return replace(self, ood_fdr=flags, fdr=float(q), _rows=None)

    @staticmethod
    def concatenate(parts: list[Predictions]) -> Predictions:
        if not parts:
            raise ValueError("no predictions to concatenate")
        first = parts[0]

        def cat(name: str) -> np.ndarray | None:
            values = [getattr(p, name) for p in parts]
            return None if any(v is None for v in values) else np.concatenate(values, axis=0)

        return Predictions(
            item_ids=[i for p in parts for i in p.item_ids],
            scores=cat("scores"),
            p_values=cat("p_values"),
            ood=cat("ood"),
            errors=[e for p in parts for e in p.errors],
            alpha=first.alpha,
            class_names=first.class_names,
            probabilities=cat("probabilities"),
            set_mask=cat("set_mask"),
            calibrated=first.calibrated,
        )
