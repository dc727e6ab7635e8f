"""The detector contract, its registry and its persistence.

A detector turns :class:`~oodscope.backbones.base.Features` into one OOD score per image, **higher =
more OOD**. It is created by name (``create("energy", temperature=1.0)``; an unknown parameter is
refused there, with the valid ones listed), declares its ``kind`` once
(:class:`~oodscope.detectors.kinds.DetectorKind`), is fitted with the one signature every detector
shares, ``fit(features=None, labels=None, *, text_encoder=None, cache=None)`` — what a configured
instance needs is :meth:`Detector.fit_needs`, and :func:`oodscope.detectors.fitting.fit_detector` is
the one fit path for callers — and applied with ``score(features)``. Hyper-parameters are the
keyword arguments of ``__init__`` (scikit-learn style: stored unchanged under the same names);
fitted arrays live in ``self.state_`` (name -> tensor) and fitted scalars in ``self.fit_info_``
(JSON-able), which is everything ``save`` writes.

Subclasses implement ``_score(inputs)`` (and ``_fit(inputs, labels)`` if ``needs_fit``), where
``inputs`` maps each name in :meth:`Detector.fields` (by default the class's ``requires``) to a
float tensor on one device. Class attributes are facts about the class and are never rewritten per
instance: what depends on the parameters is answered by the methods ``fields()``, ``fit_needs()``
and ``score_chunk_rows()``. Everything is batched tensor algebra: no Python loop over samples.
"""

from __future__ import annotations

import inspect
import os
import sys
import warnings
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from oodscope.backbones.base import Features
from oodscope.detectors.kinds import DetectorKind, FitNeeds, missing_fit_inputs, needs_of_kind

ArrayLike = np.ndarray | torch.Tensor
FeatureInput = Features | ArrayLike | dict


class DetectorError(ValueError):
    """A detector was given something it cannot use (missing features, unfitted, wrong shapes)."""


class FitWarning(UserWarning):
    """A fit succeeded but its result is unreliable (e.g. fewer fit images than feature dimensions).

    The message is also kept in ``fit_info_["warnings"]`` so that saved detectors and benchmark
    tables carry it."""


class Detector:
    """Base class: see the module docstring for the contract."""

    name: ClassVar[str] = ""
    #: How the detector learns and is applied (declared once per class; see :mod:`oodscope.detectors.kinds`).
    kind: ClassVar[DetectorKind]
    #: Keyword options of ``fit`` besides the shared ones (e.g. the ensemble's ``calibration``).
    fit_options: ClassVar[tuple[str, ...]] = ()
    #: Features fields read at fit and score time ("logits", "penultimate", "weight", "bias", "embedding", ...).
    requires: ClassVar[tuple[str, ...]] = ()
    #: True when ``fit`` must see in-distribution data before ``score``.
    needs_fit: ClassVar[bool] = False
    #: True when ``fit`` needs class labels of the ID data.
    needs_labels: ClassVar[bool] = False
    #: Rows scored per chunk; bounds memory for methods with (batch x train) intermediates.
    score_batch_size: ClassVar[int] = 8192

    def __init__(self) -> None:
        self.state_: dict[str, torch.Tensor] = {}
        self.fit_info_: dict[str, Any] = {}
        self.is_fitted_: bool = False
        #: The named preset the parameters were resolved from (:func:`create`), None for class defaults.
        self.preset_: str | None = None

    # ----------------------------------------------------------------- parameters
    def get_params(self) -> dict[str, Any]:
        """The constructor's keyword arguments as they were given (JSON-able)."""
        return {name: getattr(self, name) for name in parameters(type(self))}

    @classmethod
    def upgrade_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """Parameters saved by an earlier oodscope, in this version's terms (default: unchanged);
        loading calls it, so a detector or model saved before a parameter was renamed still loads."""
        return dict(params)

    @classmethod
    def inherited_parameters(cls) -> dict[str, Any]:
        """Parameters a class takes through ``**options`` and that a base class declares once
        (name -> default); e.g. the prompt options every zero-shot detector shares."""
        return {}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"

    # ----------------------------------------------------------------- fit / score
    def fields(self) -> tuple[str, ...]:
        """Features fields this configured instance reads (default: the class's ``requires``)."""
        return type(self).requires

    @classmethod
    def class_fit_needs(cls) -> FitNeeds:
        """What ``fit`` needs for the class's defaults (from ``kind``, ``needs_fit``, ``needs_labels``;
        a base class whose fit works differently, e.g. through the network, says so here once)."""
        return needs_of_kind(cls.kind, needs_fit=cls.needs_fit, needs_labels=cls.needs_labels)

    def fit_needs(self) -> FitNeeds:
        """What ``fit`` needs for this configured instance (default: :meth:`class_fit_needs`)."""
        return type(self).class_fit_needs()

    def score_chunk_rows(self) -> int:
        """Rows scored per chunk by :meth:`score` (bounds memory)."""
        return int(self.score_batch_size)

    def fit(
        self,
        features: FeatureInput | None = None,
        labels: ArrayLike | None = None,
        *,
        text_encoder: Any = None,
        cache: Any = None,
        **options: Any,
    ) -> Detector:
        """Learn what the method needs (see :meth:`fit_needs`); the same signature for every detector.

        ``features``: ID features; ``labels``: their class indices; ``text_encoder``: anything with
        ``encode_texts(list[str])`` (a vision-language backbone); ``cache``: a text-embedding cache;
        ``options``: the class's ``fit_options``. What the method does not need is accepted and
        ignored (features given to a zero-shot method are only checked for their dimension).
        Returns ``self``.
        """
        unknown = sorted(set(options) - set(self.fit_options))
        if unknown:
            takes = ", ".join(self.fit_options) or "none"
            raise DetectorError(f"{self.name}: fit() got unknown option(s) {unknown}; its options: {takes}")
        needs = self.fit_needs()
        missing = missing_fit_inputs(
            needs, features=features is not None, labels=labels is not None, text_encoder=text_encoder is not None
        )
        if missing:
            raise DetectorError(f"{self.name} ({type(self).kind.label}): fit needs {' and '.join(missing)}")
        if needs.text_encoder and not callable(getattr(text_encoder, "encode_texts", None)):
            raise DetectorError(
                f"{self.name}: text_encoder must have encode_texts(list[str]) (a vision-language backbone)"
            )
        self.state_ = {}
        self.fit_info_ = {}
        self.is_fitted_ = False  # stays False if fitting raises half-way
        self._fitting = True
        try:
            inputs = None if features is None or needs.model else self._inputs(features)
            label_tensor = None
            if labels is not None and inputs is not None:
                label_tensor = _label_tensor(labels, _rows(inputs), _device_of(inputs), self.name)
            with torch.no_grad():
                self._fit_from(inputs, label_tensor, text_encoder=text_encoder, cache=cache, **options)
        finally:
            self._fitting = False
        self.is_fitted_ = True
        return self

    def _fit_from(
        self,
        inputs: dict[str, torch.Tensor] | None,
        labels: torch.Tensor | None,
        *,
        text_encoder: Any = None,
        cache: Any = None,
        **options: Any,
    ) -> None:
        """The kind's fit step, called by :meth:`fit` with checked inputs. Default: ``_fit`` on features."""
        if inputs is not None:
            self._fit(inputs, labels)

    def score(self, features: FeatureInput) -> np.ndarray:
        """OOD score per image, float64, higher = more OOD."""
        if self.needs_fit and not self.is_fitted_:
            raise DetectorError(f"{self.name}: call fit(...) with in-distribution features before score(...)")
        inputs = self._inputs(features)
        n = _rows(inputs)
        out = []
        with torch.no_grad():
            rows = self.score_chunk_rows()
            for start in range(0, n, rows):
                stop = start + rows
                chunk = {k: _slice_rows(k, v, start, stop) for k, v in inputs.items()}
                out.append(self._score(chunk).detach().to("cpu", torch.float64))
        scores = torch.cat(out).numpy() if out else np.zeros(0)
        if scores.shape != (n,):
            raise DetectorError(f"{self.name}: produced scores of shape {scores.shape}, expected ({n},)")
        return scores

    def _fit(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None) -> None:
        """Default: nothing to learn (output-based methods)."""

    def _caution(self, message: str) -> None:
        """Record a fit-time caution in ``fit_info_["warnings"]`` and emit it as a :class:`FitWarning`."""
        self.fit_info_.setdefault("warnings", []).append(message)
        warnings.warn(f"{self.name}: {message}", FitWarning, stacklevel=_stacklevel_outside_detectors())

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # ----------------------------------------------------------------- inputs
    _fitting: bool = False  # True while fit() runs (feature selection reads what the fit data offer)

    def _inputs(self, features: FeatureInput, fields: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """Gather ``fields`` (default :meth:`fields`) as float tensors on one device, with clear errors."""
        requires = self.fields() if fields is None else tuple(fields)
        if isinstance(features, np.ndarray | torch.Tensor):
            per_image = [r for r in requires if _per_image(r)]
            if len(requires) != 1 or len(per_image) != 1:
                raise DetectorError(
                    f"{self.name} needs {list(requires)}; pass a Features object or a dict, not one array"
                )
            features = {per_image[0]: features}
        if isinstance(features, Features):
            have = features.available()
            get = lambda name: getattr(features, name)  # noqa: E731
        elif isinstance(features, dict):
            have = {k for k, v in features.items() if v is not None}
            get = features.__getitem__
        else:
            raise DetectorError(f"{self.name}: expected Features, a dict or an array, got {type(features).__name__}")
        missing = [r for r in requires if r not in have]
        if missing:
            origin = getattr(features, "backbone_id", None) if isinstance(features, Features) else None
            raise DetectorError(
                f"{self.name} needs {missing} from the backbone's features, but "
                f"{'backbone ' + repr(origin) if origin else 'the input'} provides only {sorted(have)}. "
                "Choose a backbone that exposes them (e.g. a classifier for logit-based methods)."
            )
        device = None
        for r in requires:
            v = get(r)
            if torch.is_tensor(v):
                device = v.device
                break
        device = device or torch.device("cpu")
        out = {}
        for r in requires:
            v = get(r)
            if isinstance(v, dict):  # Features.layers
                out[r] = {k: _to_tensor(x, device, f"{r}[{k}]", self.name) for k, x in v.items()}
            elif isinstance(v, float | int):
                out[r] = torch.tensor(float(v), device=device)
            else:
                out[r] = _to_tensor(v, device, r, self.name)
        rows = {len(v) for k, v in out.items() if _per_image(k) and torch.is_tensor(v)}
        if len(rows) > 1:
            raise DetectorError(f"{self.name}: inputs disagree on the number of images: {sorted(rows)}")
        return out

    def _state(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """A fitted array on the device and dtype of ``like``."""
        return self.state_[name].to(device=like.device, dtype=like.dtype)

    # ----------------------------------------------------------------- persistence
    def save(self, directory: str | os.PathLike, backbone_id: str | None = None) -> Path:
        """Write parameters (JSON) and fitted arrays (safetensors) to ``directory``
        (:func:`oodscope.detectors.persistence.save_detector`)."""
        from oodscope.detectors.persistence import save_detector

        return save_detector(self, directory, backbone_id)


# --------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[Detector]] = {}


def _stacklevel_outside_detectors() -> int:
    """Stack level of the first frame outside this package, so a warning points at the user's fit()."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def register(cls: type[Detector]) -> type[Detector]:
    """Class decorator: make a detector creatable by its ``name`` (it must declare its ``kind``)."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    if not isinstance(getattr(cls, "kind", None), DetectorKind):
        raise TypeError(f"{cls.__name__} declares no kind (a DetectorKind)")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"detector name {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def create(name: str, preset: str | None = None, **params: Any) -> Detector:
    """A new detector by registry name, e.g. ``create("vim", dim=512)``.

    ``preset``: a named protocol of :mod:`oodscope.detectors.presets` (``"paper-imagenet"``,
    ``"paper-cifar"``, ``"openood-v1.5"``) whose values for ``name`` are used; ``params`` given
    explicitly override them. The name is kept on the detector (``preset_``) and saved with it."""
    from oodscope.detectors.presets import resolve_params  # lazy: presets imports this module

    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise DetectorError(f"unknown detector {name!r}; registered: {', '.join(sorted(_REGISTRY))}") from None
    params = resolve_params(name, preset, params)
    check_params(cls, params)
    detector = cls(**params)
    detector.preset_ = preset
    return detector


def parameters(cls: type[Detector]) -> dict[str, Any]:
    """A detector class's parameters: name -> default (``inspect.Parameter.empty`` when required).

    Those of its ``__init__`` signature, then those it takes through ``**options`` as declared by
    :meth:`Detector.inherited_parameters`."""
    signature = inspect.signature(cls.__init__)
    own = {
        name: p.default
        for name, p in signature.parameters.items()
        if name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    return own | {k: v for k, v in cls.inherited_parameters().items() if k not in own}


def check_params(cls: type[Detector], params: dict[str, Any], *, partial: bool = False) -> None:
    """Refuse unknown parameter names and (unless ``partial``) missing required ones, naming the valid ones."""
    valid = parameters(cls)
    unknown = sorted(set(params) - set(valid))
    missing = [] if partial else [k for k, v in valid.items() if v is inspect.Parameter.empty and k not in params]
    if unknown or missing:
        problems = []
        if unknown:
            problems.append(f"unknown parameter(s) {', '.join(unknown)}")
        if missing:
            problems.append(f"missing required parameter(s) {', '.join(missing)}")
        listing = ", ".join(
            k if v is inspect.Parameter.empty else f"{k}={v!r}" for k, v in valid.items()
        ) or "none"
        raise DetectorError(f"{cls.name}: {'; '.join(problems)}; its parameters: {listing}")


def registered() -> dict[str, type[Detector]]:
    """Registry name -> class, sorted by name."""
    return dict(sorted(_REGISTRY.items()))


# --------------------------------------------------------------------- helpers
_PER_MODEL = {"weight", "bias", "logit_scale"}


def _per_image(name: str) -> bool:
    return name not in _PER_MODEL


def _rows(inputs: dict[str, Any]) -> int:
    for k, v in inputs.items():
        if _per_image(k):
            return len(next(iter(v.values()))) if isinstance(v, dict) else len(v)
    raise DetectorError("no per-image input was given")


def _slice_rows(name: str, value: Any, start: int, stop: int) -> Any:
    if not _per_image(name):
        return value
    if isinstance(value, dict):
        return {k: v[start:stop] for k, v in value.items()}
    return value[start:stop]


def _device_of(inputs: dict[str, Any]) -> torch.device:
    for v in inputs.values():
        if torch.is_tensor(v):
            return v.device
    return torch.device("cpu")


def _label_tensor(labels: ArrayLike, rows: int, device: torch.device, who: str) -> torch.Tensor:
    y = labels.detach().cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)
    if y.ndim != 1 or len(y) != rows:
        raise DetectorError(f"{who}: labels must be 1-D with one label per image ({rows}), got shape {y.shape}")
    if y.dtype.kind not in "iu" and not (y.dtype.kind in "fb" and np.all(np.mod(y, 1) == 0)):
        raise DetectorError(f"{who}: labels must be integer class indices")
    return torch.from_numpy(y.astype(np.int64)).to(device)


def _to_tensor(value: Any, device: torch.device, field: str, who: str) -> torch.Tensor:
    t = value if torch.is_tensor(value) else torch.from_numpy(np.ascontiguousarray(value))
    if not torch.is_floating_point(t):
        t = t.float()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    t = t.to(device)
    if not torch.isfinite(t).all():
        raise DetectorError(f"{who}: input {field!r} contains NaN or infinite values")
    return t
