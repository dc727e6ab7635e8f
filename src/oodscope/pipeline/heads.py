"""Class-prediction heads: which ID class an accepted image most likely belongs to.

A head maps :class:`~oodscope.backbones.base.Features` to class probabilities ``(N, K)`` over the
model's ID classes. The pipeline calibrates conformal prediction sets on them; the OOD decision
never depends on the head.

* :class:`ZeroShotHead` — ``softmax(s * cos(x, t_k))`` with the detector's class text embeddings
  ``t_k``. ``s`` is the backbone's ``Features.logit_scale`` (CLIP/SigLIP: about 100), else
  :data:`CONSE_LOGIT_SCALE` for ConSE backbones and :data:`DEFAULT_LOGIT_SCALE` otherwise.
* :class:`LinearProbeHead` — multinomial logistic regression on the (L2-normalized) image embedding,
  fitted on the ID fit split (:mod:`oodscope.detectors._linear_probe`), default ``C = 100``.
* :class:`LogitsHead` — ``softmax(Features.logits)``: a user's own classifier trained on the ID
  classes.

Each head saves as ``head.json`` (kind, class names, scalars) plus ``head.safetensors`` (arrays).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from oodscope.backbones.base import Features

HEAD_FORMAT = "oodscope-head"
HEAD_FORMAT_VERSION = 1
HEAD_CONFIG = "head.json"
HEAD_ARRAYS = "head.safetensors"

#: CLIP's learned temperature (exp(4.6052) = 100); used when the backbone does not report one.
DEFAULT_LOGIT_SCALE = 100.0
#: ConSE's cosines (MiniLM sentence space) are compressed (0.00-0.62 on Fashion-MNIST), so s = 100 would
#: make the zero-shot head wildly over-confident. On 300 Fashion-MNIST test images of the six ID classes
#: the negative log-likelihood of softmax(s * cos) is 1.757 at s = 1, 1.596 at s = 10, 1.594 at s = 12
#: (the minimum of the grid 1..15), 1.608 at s = 15 and 4.49 at s = 100 (docs/pipeline.md).
CONSE_LOGIT_SCALE = 10.0
#: Inverse L2 strength of the linear probe. On Fashion-MNIST with EfficientNet-Lite0 embeddings (300 test
#: images of the six ID classes) the test NLL with 5 training images per class is 1.31 / 0.68 / 0.42 / 0.33
#: for C = 1 / 10 / 100 / 1000, and with 20 per class 0.79 / 0.33 / 0.22 / 0.23: C = 100 is best or close
#: to it in both (sklearn's default C = 1 is badly under-confident on unit-norm features).
DEFAULT_PROBE_C = 100.0


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class ClassHead:
    """Base class: ``probabilities(features) -> (N, K)`` float64, rows sum to 1."""

    kind: ClassVar[str] = ""

    def __init__(self, class_names: list[str]) -> None:
        if len(class_names) < 2:
            raise ValueError(f"a class head needs at least 2 classes, got {len(class_names)}")
        self.class_names = [str(c) for c in class_names]

    def probabilities(self, features: Features) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- persistence --------------------------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _config(self) -> dict[str, Any]:
        return {}

    def save(self, directory: str | os.PathLike) -> Path:
        from safetensors.numpy import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: np.ascontiguousarray(v) for k, v in self._arrays().items()}, str(directory / HEAD_ARRAYS))
        config = {"format": HEAD_FORMAT, "format_version": HEAD_FORMAT_VERSION, "kind": self.kind,
                  "class_names": self.class_names, **self._config()}
        (directory / HEAD_CONFIG).write_text(json.dumps(config, indent=2))
        return directory

    def describe(self) -> str:
        return self.kind


def _embedding(features: Features, who: str) -> np.ndarray:
    if features.embedding is None or features.embedding.ndim != 2:
        raise ValueError(f"{who}: features have no (N, D) embedding")
    return np.asarray(features.embedding, dtype=np.float64)


class ZeroShotHead(ClassHead):
    """``softmax(logit_scale * cos(x, t_k))`` over the ID class text embeddings ``t_k`` (K, D)."""

    kind = "zeroshot"

    def __init__(self, class_text: np.ndarray, class_names: list[str], logit_scale: float) -> None:
        super().__init__(class_names)
        text = np.asarray(class_text, dtype=np.float64)
        if text.ndim != 2 or len(text) != len(self.class_names):
            raise ValueError(f"class_text must be (K={len(self.class_names)}, D), got {text.shape}")
        if not logit_scale > 0:
            raise ValueError("logit_scale must be > 0")
        self.class_text = _unit(text)
        self.logit_scale = float(logit_scale)

    @staticmethod
    def scale_for(features_logit_scale: float | None, backbone_id: str | None) -> float:
        """The documented choice of ``s``: the backbone's own, else ConSE's, else 100."""
        if features_logit_scale is not None:
            return float(features_logit_scale)
        if backbone_id and backbone_id.startswith("conse:"):
            return CONSE_LOGIT_SCALE
        return DEFAULT_LOGIT_SCALE

    def probabilities(self, features: Features) -> np.ndarray:
        x = _unit(_embedding(features, "zero-shot head"))
        if x.shape[1] != self.class_text.shape[1]:
            raise ValueError(
                f"zero-shot head: image embeddings have dimension {x.shape[1]}, class texts {self.class_text.shape[1]}"
            )
        return _softmax(self.logit_scale * (x @ self.class_text.T))

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"class_text": self.class_text.astype(np.float32)}

    def _config(self) -> dict[str, Any]:
        return {"logit_scale": self.logit_scale}

    def describe(self) -> str:
        return f"zero-shot: softmax({self.logit_scale:g} * cos(image, class text))"


class LinearProbeHead(ClassHead):
    """Logistic regression ``softmax(normalize(x) @ W.T + b)`` on the image embedding."""

    kind = "linear_probe"

    def __init__(
        self, weight: np.ndarray, bias: np.ndarray, class_names: list[str], *, normalize: bool = True,
        C: float = DEFAULT_PROBE_C,
    ) -> None:
        super().__init__(class_names)
        self.weight = np.asarray(weight, dtype=np.float32)
        self.bias = np.asarray(bias, dtype=np.float32)
        if self.weight.ndim != 2 or self.weight.shape[0] != len(self.class_names) or self.bias.shape != (
            len(self.class_names),
        ):
            raise ValueError(f"linear probe: weight {self.weight.shape} / bias {self.bias.shape} do not match "
                             f"{len(self.class_names)} classes")
        self.normalize = bool(normalize)
        self.C = float(C)

    @classmethod
    def fit(
        cls, features: Features, labels: np.ndarray, class_names: list[str], *, C: float = DEFAULT_PROBE_C,
        normalize: bool = True,
    ) -> LinearProbeHead:
        from oodscope.detectors._linear_probe import fit_linear_probe

        labels = np.asarray(labels, dtype=np.int64)
        known = labels >= 0
        if known.sum() < 2 or len(np.unique(labels[known])) < 2:
            raise ValueError("a linear probe needs labelled images of at least 2 classes")
        weight, bias = fit_linear_probe(
            _embedding(features, "linear probe")[known], labels[known], C=C, normalize=normalize,
            num_classes=len(class_names),
        )
        return cls(weight, bias, class_names, normalize=normalize, C=C)

    def probabilities(self, features: Features) -> np.ndarray:
        from oodscope.detectors._linear_probe import probe_logits

        x = torch.from_numpy(np.ascontiguousarray(_embedding(features, "linear probe")))
        if x.shape[1] != self.weight.shape[1]:
            raise ValueError(f"linear probe: embeddings have dimension {x.shape[1]}, weights {self.weight.shape[1]}")
        logits = probe_logits(x, torch.from_numpy(self.weight).double(), torch.from_numpy(self.bias).double(),
                              normalize=self.normalize)
        return _softmax(logits.numpy())

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"weight": self.weight, "bias": self.bias}

    def _config(self) -> dict[str, Any]:
        return {"normalize": self.normalize, "C": self.C}

    def describe(self) -> str:
        return f"linear probe (logistic regression, C={self.C:g}) on the image embedding"


class LogitsHead(ClassHead):
    """``softmax(Features.logits)``: the backbone is itself a classifier of the ID classes."""

    kind = "logits"

    def probabilities(self, features: Features) -> np.ndarray:
        if features.logits is None:
            raise ValueError("logits head: the backbone's features have no logits")
        logits = np.asarray(features.logits, dtype=np.float64)
        if logits.shape[1] != len(self.class_names):
            raise ValueError(f"logits head: {logits.shape[1]} logits but {len(self.class_names)} class names")
        return _softmax(logits)

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"_empty": np.zeros(0, dtype=np.float32)}  # safetensors wants at least one tensor

    def describe(self) -> str:
        return "the backbone's own classifier: softmax(logits)"


def load_head(directory: str | os.PathLike) -> ClassHead:
    """Read a head written by :meth:`ClassHead.save`."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    config = json.loads((directory / HEAD_CONFIG).read_text())
    if config.get("format") != HEAD_FORMAT or config.get("format_version") != HEAD_FORMAT_VERSION:
        raise ValueError(f"{directory}: not an oodscope head of format version {HEAD_FORMAT_VERSION}")
    arrays = load_file(str(directory / HEAD_ARRAYS))
    kind, names = config["kind"], config["class_names"]
    if kind == ZeroShotHead.kind:
        return ZeroShotHead(arrays["class_text"], names, config["logit_scale"])
    if kind == LinearProbeHead.kind:
        return LinearProbeHead(arrays["weight"], arrays["bias"], names, normalize=config["normalize"], C=config["C"])
    if kind == LogitsHead.kind:
        return LogitsHead(names)
    raise ValueError(f"{directory}: unknown head kind {kind!r}")


def fit_head(head: str | None, features: Features, labels: np.ndarray | None, names: list[str] | None,
             backbone: Any, head_params: dict[str, Any]) -> tuple[ClassHead | None, list[str] | None, bool]:
    """The class head a model asks for, fitted on its ID fit data: ``(head, class names, scale_from_features)``.

    ``auto``: a linear probe when the data have labels of at least 2 classes, else none;
    ``linear_probe`` / ``logits`` (the backbone's own classes when the data name none) / ``zeroshot``
    (prompt embeddings of the class names). ``scale_from_features``: the zero-shot head takes the
    backbone's own logit scale from the calibration features (unless ``head_params`` sets one).
    """
    from oodscope.pipeline.inputs import OODModelError

    has_labels = labels is not None and names is not None and len(np.unique(labels[labels >= 0])) >= 2
    if head == "auto" and has_labels or head == "linear_probe":
        if not has_labels:
            raise OODModelError("a linear-probe head needs labelled ID images of at least 2 classes")
        C = head_params.get("C")
        return LinearProbeHead.fit(features, labels, names, **({"C": C} if C is not None else {})), names, False
    if head == "logits":
        if names is None:
            names = list(getattr(backbone, "class_names", None) or [])
        return LogitsHead(names), names, False
    if head == "zeroshot":
        if names is None:
            raise OODModelError("a zero-shot head needs the ID class names")
        return zero_shot_head(backbone, names, head_params), names, "logit_scale" not in head_params
    return None, names, False


def zero_shot_head(backbone: Any, names: list[str], head_params: dict[str, Any],
                   class_text: np.ndarray | None = None) -> ZeroShotHead:
    """Cosine to the class prompts (``class_text``, default: the simple prompt of each name) times a logit scale."""
    if class_text is None:
        from oodscope.text.prompts import class_text_embeddings

        class_text = class_text_embeddings(backbone, names, "simple")
    return ZeroShotHead(class_text, names, head_params.get("logit_scale")
                        or ZeroShotHead.scale_for(None, getattr(backbone, "id", None)))

