"""The backbone contract: what every model that turns images (and texts) into features provides.

A backbone knows nothing about detectors. It receives a batch of already-preprocessed images
(a float tensor laid out as its :class:`InputSpec` says) and returns :class:`Features`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    import torch

ResizePolicy = Literal["shorter_center_crop", "stretch", "letterbox"]

#: Where a backbone's network runs: eager PyTorch, or its export (``oodscope export``, backbones/exported.py).
RUNTIMES = ("torch", "onnxruntime", "openvino")

# Names of the per-image arrays in Features; everything else in it is per-model.
PER_IMAGE_FIELDS = ("embedding", "logits", "penultimate", "patches")


@dataclass(frozen=True)
class InputSpec:
    """How images must be prepared for a backbone.

    ``size`` is the square side fed to the network. ``crop_fraction`` applies to the
    ``shorter_center_crop`` policy: the shorter side is resized to ``size / crop_fraction`` and
    the centre ``size`` x ``size`` is kept (the usual ImageNet evaluation protocol).
    Pixels are scaled to [0, 1], then ``(x - mean) / std`` per channel.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: ResizePolicy = "shorter_center_crop"
    crop_fraction: float = 0.875
    interpolation: Literal["bilinear", "bicubic"] = "bicubic"

    def key(self) -> str:
        """A short string that changes whenever preprocessing output would change (cache key)."""
        return (
            f"{self.size}|{self.resize}|{self.crop_fraction:g}|{self.interpolation}|"
            f"{','.join(f'{v:g}' for v in self.mean)}|{','.join(f'{v:g}' for v in self.std)}"
        )


@dataclass
class Features:
    """What a backbone says about a batch of images.

    Per image (first axis = images):
      - ``embedding`` (N, D): the image embedding. For vision-language backbones it lives in the
        joint image-text space and is L2-normalized; for classifiers it is the pooled penultimate
        activation.
      - ``logits`` (N, C): classifier outputs, when the model has a classification head.
      - ``penultimate`` (N, D'): input of the final linear layer (what ReAct/ASH/DICE/ViM shape).
      - ``patches`` (N, P, D): local features (patch tokens projected into the joint space for
        CLIP, spatial cells of the last feature map for CNNs); only when asked for.
      - ``layers``: name -> (N, D_l) pooled intermediate activations (multi-layer Mahalanobis).
      - ``dense``: name -> (N, C_l, h_l, w_l) spatial feature maps (image anomaly detection with
        pixel maps); float16 or float32; only when asked for.

    Per model:
      - ``weight`` (C, D') and ``bias`` (C,): the final linear layer, so logits == penultimate @ W.T + b.
      - ``logit_scale``: the temperature vision-language models multiply cosine similarities by.
      - ``class_names``: names of the logits' classes, when known.
      - ``backbone_id``: who made these features.
    """

    embedding: np.ndarray
    logits: np.ndarray | None = None
    penultimate: np.ndarray | None = None
    patches: np.ndarray | None = None
    layers: dict[str, np.ndarray] = field(default_factory=dict)
    dense: dict[str, np.ndarray] = field(default_factory=dict)
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    logit_scale: float | None = None
    class_names: list[str] | None = None
    backbone_id: str | None = None

    def __post_init__(self) -> None:
        n = len(self.embedding)
        for name in PER_IMAGE_FIELDS[1:]:
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"Features.{name} has {len(value)} rows but embedding has {n}")
        for group in ("layers", "dense"):
            for name, value in getattr(self, group).items():
                if len(value) != n:
                    raise ValueError(f"Features.{group}[{name!r}] has {len(value)} rows but embedding has {n}")

    def __len__(self) -> int:
        return len(self.embedding)

    def available(self) -> set[str]:
        """Names of the fields that hold something (used by detectors to check their needs)."""
        have = {
            f.name for f in fields(self) if f.name not in ("layers", "dense") and getattr(self, f.name) is not None
        }
        have |= {group for group in ("layers", "dense") if getattr(self, group)}
        return have

    def subset(self, index: np.ndarray | slice | list[int]) -> Features:
        """Rows ``index`` of every per-image array; per-model fields are shared."""
        picked = {
            name: (None if getattr(self, name) is None else getattr(self, name)[index])
            for name in PER_IMAGE_FIELDS
        }
        return Features(
            **picked,
            layers={k: v[index] for k, v in self.layers.items()},
            dense={k: v[index] for k, v in self.dense.items()},
            weight=self.weight,
            bias=self.bias,
            logit_scale=self.logit_scale,
            class_names=self.class_names,
            backbone_id=self.backbone_id,
        )

    @staticmethod
    def concatenate(parts: list[Features]) -> Features:
        """Stack features of consecutive batches (per-model fields are taken from the first)."""
        if not parts:
            raise ValueError("cannot concatenate an empty list of Features")
        first = parts[0]
        stacked = {}
        for name in PER_IMAGE_FIELDS:
            values = [getattr(p, name) for p in parts]
            if any(v is None for v in values):
                if not all(v is None for v in values):
                    raise ValueError(f"some batches have Features.{name} and others do not")
                stacked[name] = None
            else:
                stacked[name] = np.concatenate(values, axis=0)
        layers = {k: np.concatenate([p.layers[k] for p in parts], axis=0) for k in first.layers}
        dense = {k: np.concatenate([p.dense[k] for p in parts], axis=0) for k in first.dense}
        return Features(
            **stacked,
            layers=layers,
            dense=dense,
            weight=first.weight,
            bias=first.bias,
            logit_scale=first.logit_scale,
            class_names=first.class_names,
            backbone_id=first.backbone_id,
        )


@dataclass
class ClassifierParts:
    """Differentiable access to a classifier, for model-in-the-loop detectors (ODIN, GradNorm, RankFeat).

    ``feature_map(x)`` runs the network up to its last spatial feature map (N, C, H, W) — or up to
    the penultimate vector (N, D) for models without one; ``pool(map)`` turns that into the
    penultimate vector (N, D); ``head`` is the final linear layer. So
    ``logits == head(pool(feature_map(x)))``.

    Optional (None when a backbone cannot give them): ``network``, the whole ``nn.Module`` mapping
    normalized images to logits as the model itself runs it, dropout included (MC Dropout);
    ``layers(x)``, name -> (N, D_l) pooled intermediate activations, differentiable and the same as
    the backbone's ``Features.layers`` (Mahalanobis ensemble with input pre-processing).
    """

    feature_map: object  # Callable[[torch.Tensor], torch.Tensor]
    pool: object  # Callable[[torch.Tensor], torch.Tensor]
    head: object  # torch.nn.Linear
    input_spec: InputSpec
    device: str = "cpu"
    network: object = None  # torch.nn.Module | None
    layers: object = None  # Callable[[torch.Tensor], dict[str, torch.Tensor]] | None


@runtime_checkable
class Backbone(Protocol):
    """What every backbone provides. Vision-language backbones also implement :class:`TextEncoder`."""

    id: str
    input_spec: InputSpec
    device: str

    def encode_images(self, batch: torch.Tensor) -> Features:
        """Features for a preprocessed batch (N, 3, size, size), float32, on any device."""
        ...

    def weights_fingerprint(self) -> str:
        """A short hash that changes when the weights change (recorded with fitted models, cache keys)."""
        ...


@runtime_checkable
class TextEncoder(Protocol):
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """L2-normalized text embeddings (len(texts), D) in the same space as image embeddings."""
        ...


def is_vision_language(backbone: object) -> bool:
    return callable(getattr(backbone, "encode_texts", None))


def derived_from(backbone: object) -> tuple[object, Callable[[Features], Features] | None]:
    """The network that runs on images and the conversion of its features into ``backbone``'s.

    A *derived* backbone (ConSE over a classifier) exposes the network it is computed from as
    ``classifier`` and a cheap ``from_classifier_features(features)``: extraction runs (and caches)
    the network, so one feature store serves the classifier and every backbone derived from it.
    Any other backbone runs itself: ``(backbone, None)``. This is the one place that knows.
    """
    convert = getattr(backbone, "from_classifier_features", None)
    network = getattr(backbone, "classifier", None)
    if callable(convert) and network is not None and callable(getattr(network, "encode_images", None)):
        return network, convert
    return backbone, None


def l2_normalize(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, eps)
