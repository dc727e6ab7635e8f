"""ConSE: a zero-shot vision-language backbone built from an ImageNet classifier and a sentence encoder.

Norouzi, Mikolov, Bengio, Singer, Shlens, Frome, Corrado, Dean, "Zero-Shot Learning by Convex
Combination of Semantic Embeddings", ICLR 2014.

Image embedding: ``f(x) = (1/Z) * sum_{t=1..T} p(y_t | x) * s(y_t)`` over the classifier's top-T
ImageNet classes y_t, with ``Z = sum_t p(y_t | x)`` and ``s(y)`` the sentence embedding of the
class's WordNet lemmas (``label_template``, default ``"{}"``, wraps them); then L2-normalized so
that cosine similarity to any text embedding works as for CLIP. Default T = 10 (the paper's best
setting on ImageNet). Texts are embedded by the same sentence encoder, so class names never seen by
the classifier can be matched.

This is the packaged offline default that makes every zero-shot method runnable without a hub.
With ``patches=True`` each cell of the classifier's last feature map goes through the classifier
head and the same convex combination, giving local embeddings for GL-MCM-style methods; with
``dense_grid=True`` the same cell embeddings are also ``Features.dense["conse"]``, a (N, D, g, g)
grid (stride 32), for anomaly methods that compare local features with texts (WinCLIP offline).
The classifier's own dense maps (``dense_layers``) are passed through.
"""

from __future__ import annotations

import hashlib
import os
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from oodscope.backbones.base import Features
from oodscope.backbones.imagenet import imagenet_lemmas

DEFAULT_TOP_T = 10
_LABEL_MEMO: dict[str, torch.Tensor] = {}


def _label_cache_dir() -> Path:
    root = os.environ.get("OODSCOPE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "oodscope") / "conse-labels"


def _load_or_encode(key: str, texts: list[str], text_encoder) -> torch.Tensor:
    from safetensors.torch import load_file, save_file

    path = _label_cache_dir() / f"{key}.safetensors"
    if path.is_file():
        try:
            return load_file(str(path))["labels"]
        except Exception:  # noqa: BLE001 - a damaged cache file is simply recomputed
            pass
    embeddings = torch.from_numpy(text_encoder.encode_texts(texts)).float().contiguous()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        save_file({"labels": embeddings}, str(tmp))
        os.replace(tmp, path)
    except OSError:  # a read-only home only costs the re-computation next time
        pass
    return embeddings
# Measured on 1,000 Fashion-MNIST test images (docs/backbones.md): embedding every WordNet lemma of
# a class ("jersey, T-shirt, tee shirt") without a template matched product names best.
DEFAULT_LABEL_TEMPLATE = "{}"


class ConSE:
    """Vision-language backbone: ``encode_images`` and ``encode_texts`` share the sentence space."""

    def __init__(
        self,
        classifier: object,
        text_encoder: object,
        *,
        top_t: int = DEFAULT_TOP_T,
        label_template: str = DEFAULT_LABEL_TEMPLATE,
        patches: bool = False,
        dense_grid: bool = False,
    ) -> None:
        if top_t < 1:
            raise ValueError("top_t must be >= 1")
        if "{}" not in label_template:
            raise ValueError("label_template must contain '{}' for the class name")
        self.classifier = classifier
        self.text_encoder = text_encoder
        self.top_t = top_t
        self.label_template = label_template
        self.want_patches = patches
        self.dense_grid = dense_grid
        options = []
        if top_t != DEFAULT_TOP_T:
            options.append(f"T={top_t}")
        if label_template != DEFAULT_LABEL_TEMPLATE:
            options.append("template=" + hashlib.sha1(label_template.encode()).hexdigest()[:8])
        self.id = f"conse:{classifier.id}" + (f"?{'&'.join(options)}" if options else "")
        self.input_spec = classifier.input_spec
        self.device = classifier.device
        if patches or dense_grid:
            classifier.want_patches = True

    @cached_property
    def label_embeddings(self) -> torch.Tensor:
        """Sentence embeddings s(y) of the classifier's 1,000 class names (all WordNet lemmas, templated).

        Encoding 1,000 names takes seconds to a minute on a CPU, so the result is memoized per
        process and stored on disk (``$OODSCOPE_CACHE/conse-labels``, else ``~/.cache/oodscope``),
        keyed by the text encoder's weights and the exact texts.
        """
        texts = [self.label_template.format(", ".join(lemmas)) for lemmas in imagenet_lemmas()]
        key = hashlib.sha256("\n".join([self.text_encoder.weights_fingerprint(), *texts]).encode()).hexdigest()[:24]
        if key not in _LABEL_MEMO:
            _LABEL_MEMO[key] = _load_or_encode(key, texts, self.text_encoder)
        return _LABEL_MEMO[key]

    def weights_fingerprint(self) -> str:
        parts = f"{self.classifier.weights_fingerprint()}|{self.text_encoder.weights_fingerprint()}"
        return hashlib.sha256(parts.encode()).hexdigest()[:16]

    def convex_combination(self, logits: torch.Tensor) -> torch.Tensor:
        """ConSE embedding of logits (..., 1000) -> (..., D), L2-normalized."""
        probs = torch.softmax(logits.float(), dim=-1)
        top = probs.topk(min(self.top_t, probs.shape[-1]), dim=-1)
        weights = top.values / top.values.sum(dim=-1, keepdim=True)
        combined = (weights.unsqueeze(-1) * self.label_embeddings[top.indices]).sum(dim=-2)
        return torch.nn.functional.normalize(combined, dim=-1)

    def encode_images(self, batch: torch.Tensor) -> Features:
        return self.from_classifier_features(self.classifier.encode_images(batch))

    def from_classifier_features(self, base: Features) -> Features:
        """ConSE features from the classifier's features (e.g. read back from a feature cache)."""
        if base.logits is None:
            raise ValueError("ConSE needs the classifier's logits")
        embedding = self.convex_combination(torch.from_numpy(np.asarray(base.logits))).numpy()
        patches = None
        dense = dict(base.dense)
        if (self.want_patches or self.dense_grid) and base.patches is not None:
            cells = torch.from_numpy(np.asarray(base.patches))
            cell_logits = cells @ torch.from_numpy(base.weight).T + torch.from_numpy(base.bias)
            cell_embeddings = self.convex_combination(cell_logits)
            patches = cell_embeddings.numpy() if self.want_patches else None
            if self.dense_grid:
                from oodscope.backbones.dense import to_dense_array, tokens_to_grid

                dense["conse"] = to_dense_array(tokens_to_grid(cell_embeddings))
        return Features(
            embedding=embedding.astype(np.float32),
            logits=base.logits,
            penultimate=base.penultimate,
            patches=patches,
            layers=base.layers,
            dense=dense,
            weight=base.weight,
            bias=base.bias,
            logit_scale=None,
            class_names=base.class_names,
            backbone_id=self.id,
        )

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return self.text_encoder.encode_texts(texts)

    def classifier_parts(self):
        return self.classifier.classifier_parts()
