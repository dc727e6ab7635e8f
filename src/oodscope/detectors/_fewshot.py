"""Shared base of the few-shot vision-language detectors (GDA, Tip-Adapter, COOkeD) and the
logit-to-score step they share with the linear probe.

These methods combine the zero-shot classifier built from the ID class names (as in
:mod:`oodscope.detectors._zeroshot`) with something learned from a few labelled ID images, so
``fit`` needs all three: ID features, their labels (``0..K-1`` in the order of ``classes``) and a
text encoder::

    det = create("gda", classes=names)
    det.fit(id_features, id_labels, text_encoder=backbone)
    scores = det.score(test_features)

Everything ``fit`` learns (text embeddings and image statistics) goes into ``state_``, so a saved
detector scores without the text encoder.

Logits become an OOD score through one of the registered output detectors (``scoring``:
``"msp"``, ``"energy"`` or ``"gen"``; ``scoring_params`` are their keyword arguments), so the score
formulas are the exact ones of ``msp.py``, ``energy.py`` and ``gen.py``. (The parameter cannot be
called ``score``: that name is the detector's ``score`` method.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from oodscope.detectors._zeroshot import PromptDetector
from oodscope.detectors.base import Detector, DetectorError, create
from oodscope.detectors.kinds import DetectorKind

#: Output detectors that can turn the ensembled logits into a score.
LOGIT_SCORES = ("msp", "energy", "gen")


def logit_scorer(scoring: str, scoring_params: Mapping[str, Any] | None, who: str) -> Detector:
    """The registered output detector that scores logits (its parameters are validated here)."""
    if scoring not in LOGIT_SCORES:
        raise DetectorError(f"{who}: scoring must be one of {list(LOGIT_SCORES)}, got {scoring!r}")
    if scoring_params is not None and not isinstance(scoring_params, Mapping):
        raise DetectorError(f"{who}: scoring_params must be a dict of {scoring!r}'s parameters")
    try:
        return create(scoring, **dict(scoring_params or {}))
    except (TypeError, DetectorError) as err:
        raise DetectorError(f"{who}: bad scoring_params for {scoring!r}: {err}") from None


def set_logit_scoring(detector: Detector, scoring: str, scoring_params: Mapping[str, Any] | None) -> None:
    """Store ``scoring`` / ``scoring_params`` as given (hyper-parameters) and the scorer they build."""
    detector.scoring = scoring
    detector.scoring_params = None if scoring_params is None else dict(scoring_params)
    detector._scorer = logit_scorer(scoring, scoring_params, detector.name)


def score_logits(scorer: Detector, logits: torch.Tensor) -> torch.Tensor:
    """OOD score of each row of ``logits`` (higher = more OOD) with an output detector."""
    return scorer._score({"logits": logits})


def check_positive(value: float, name: str, who: str, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
        raise DetectorError(f"{who}: {name} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise DetectorError(f"{who}: {name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return value


class FewShotPromptDetector(PromptDetector):
    """A zero-shot detector that also learns from labelled ID image embeddings at fit time."""

    kind: ClassVar[DetectorKind] = DetectorKind.FEW_SHOT
    needs_labels: ClassVar[bool] = True

    def _check_labels(self, labels: torch.Tensor | None) -> None:
        k = len(self.classes)
        if len(labels) == 0:
            raise DetectorError(f"{self.name}: fit needs at least one labelled image")
        if int(labels.min()) < 0 or int(labels.max()) >= k:
            raise DetectorError(f"{self.name}: labels must lie in [0, {k}) (one index per entry of classes)")

    def _fit_images(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        self._learn(inputs, labels.cpu())
        self.fit_info_["num_fit"] = int(len(labels))

    def _learn(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> None:  # pragma: no cover
        """The method's own step: learn from the labelled ID embeddings (the text side is encoded)."""
        raise NotImplementedError

    def _zero_shot_logits(self, x: torch.Tensor, logit_scale: float) -> torch.Tensor:
        """``logit_scale * cos(x, t_k)`` against the class text embeddings, in float64."""
        return logit_scale * self._cosines(x.to(torch.float64))
