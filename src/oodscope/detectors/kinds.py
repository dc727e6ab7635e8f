"""What kind of detector a class is, declared once, and what its fit therefore needs.

Every registered detector sets ``kind`` (a :class:`DetectorKind`, in the spirit of anomalib's
``LearningType``). Everything above the detectors asks the *instance* what its fit needs
(:meth:`~oodscope.detectors.base.Detector.fit_needs`, a :class:`FitNeeds`) and fits it with the one
function :func:`oodscope.detectors.fitting.fit_detector`; nobody probes flags or attributes.

A new kind (the patch-level anomaly detectors with pixel maps, say) adds one member here and one
row to :func:`needs_of_kind`; the fit function and the contract suite then cover it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class DetectorKind(str, Enum):
    """How a detector learns and how it is applied."""

    #: Post-hoc on the classifier's outputs or last layer (MSP, Energy, ReAct, ASH, DICE, ...).
    #: Some estimate a statistic from ID features (``needs_fit``); most learn nothing.
    OUTPUT = "output"
    #: Learns a model of the ID features (KNN, Mahalanobis, ViM, GMM, ...); some need labels.
    FEATURE = "feature"
    #: Built from the ID class names through a text encoder; sees no ID image (MCM, NegLabel, ...).
    ZERO_SHOT = "zero_shot"
    #: Class names through a text encoder plus a few labelled ID images (GDA, Tip-Adapter, COOkeD).
    FEW_SHOT = "few_shot"
    #: Runs the network itself (input or weight gradients, modified feature maps): ODIN, GradNorm, RankFeat.
    #: Scored with ``score_images(backbone.classifier_parts(), images)``, not from cached features.
    MODEL = "model"
    #: Starts zero-shot and adapts to the stream it scores (AdaNeg): scores depend on the order of the
    #: images, ``reset()`` starts a new stream, and conformal calibration does not apply.
    TEST_TIME = "test_time"
    #: Combines registered detectors; needs what its members need.
    ENSEMBLE = "ensemble"
    #: Image anomaly detection on dense feature maps (``Features.dense``): an image score and a
    #: pixel map per image (``score_maps``). Most fit on normal images only (PaDiM, PatchCore);
    #: zero-shot ones (MuSc, WinCLIP) declare what they need instead through ``fit_needs()``.
    ANOMALY = "anomaly"

    @property
    def label(self) -> str:
        """The kind in words, for tables and messages."""
        return _LABELS[self]


_LABELS = {
    DetectorKind.OUTPUT: "output-based",
    DetectorKind.FEATURE: "feature-space",
    DetectorKind.ZERO_SHOT: "zero-shot",
    DetectorKind.FEW_SHOT: "few-shot (with text)",
    DetectorKind.MODEL: "model-in-the-loop",
    DetectorKind.TEST_TIME: "test-time-adaptive",
    DetectorKind.ENSEMBLE: "ensemble",
    DetectorKind.ANOMALY: "image anomaly (maps)",
}


@dataclass(frozen=True)
class FitNeeds:
    """What fitting one configured detector needs, and how it is applied afterwards."""

    #: In-distribution features (fit on ID images).
    features: bool = False
    #: A class label for every ID fit image.
    labels: bool = False
    #: A text encoder (a vision-language backbone, or anything with ``encode_texts``).
    text_encoder: bool = False
    #: The ID class names (the ``classes`` parameter).
    classes: bool = False
    #: Scored through the network (``score_images``), not from features.
    model: bool = False
    #: Scores depend on the stream (``reset()`` between streams); not calibratable.
    adaptive: bool = False
    #: The fit itself runs the network on ID images: ``fit(parts=backbone.classifier_parts(), images=...)``
    #: with the preprocessed ID images (AdaSCALE, NAC-UE, EfficientAD).
    images: bool = False

    def __or__(self, other: FitNeeds) -> FitNeeds:
        return FitNeeds(**{k: getattr(self, k) or getattr(other, k) for k in self.__dataclass_fields__})

    def describe(self) -> str:
        """``"ID features + labels"``, ``"class names + text encoder"``, ``"nothing"``, ..."""
        parts = []
        if self.features:
            parts.append("ID features" + (" + labels" if self.labels else ""))
        if self.classes or self.text_encoder:
            parts.append("class names + text encoder")
        if self.images:
            parts.append("ID images through the network")
        if self.model:
            parts.append("the classifier network")
        return " + ".join(parts) if parts else "nothing"


def needs_of_kind(kind: DetectorKind, *, needs_fit: bool, needs_labels: bool) -> FitNeeds:
    """The fit needs of a detector class of ``kind`` (``needs_fit`` / ``needs_labels`` refine OUTPUT and FEATURE)."""
    if kind is DetectorKind.OUTPUT:
        return FitNeeds(features=needs_fit, labels=needs_fit and needs_labels)
    if kind is DetectorKind.FEATURE:
        return FitNeeds(features=True, labels=needs_labels)
    if kind is DetectorKind.ZERO_SHOT:
        return FitNeeds(text_encoder=True, classes=True)
    if kind is DetectorKind.FEW_SHOT:
        return FitNeeds(features=True, labels=True, text_encoder=True, classes=True)
    if kind is DetectorKind.MODEL:
        return FitNeeds(model=True)
    if kind is DetectorKind.TEST_TIME:
        return FitNeeds(text_encoder=True, classes=True, adaptive=True)
    if kind is DetectorKind.ENSEMBLE:  # the instance adds its members' needs
        return FitNeeds(features=True)
    if kind is DetectorKind.ANOMALY:  # normal images, never labels
        return FitNeeds(features=needs_fit)
    raise ValueError(f"unknown detector kind {kind!r}")


def missing_fit_inputs(needs: FitNeeds, *, features: bool, labels: bool, text_encoder: bool) -> list[str]:
    """What of the fit inputs is missing, in words (empty: nothing)."""
    missing = []
    if needs.features and not features:
        missing.append("in-distribution features")
    if needs.labels and not labels:
        missing.append("the class labels of the ID features")
    if needs.text_encoder and not text_encoder:
        missing.append("a text encoder (text_encoder=: a vision-language backbone, or any object with encode_texts)")
    return missing
