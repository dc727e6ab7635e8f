"""ConSE: a zero-shot vision-language backbone built from an ImageNet classifier and a sentence encoder.

Norouzi, Mikolov, Bengio, Singer, Shlens, Frome, Corrado, Dean, "Zero-Shot Learning by Convex
Combination of Semantic Embeddings", ICLR 2014.

Image embedding: ``f(x) = (1/Z) * sum_{t=1..T} p(y_t | x) * s(y_t)`` over the classifier's top-T
ImageNet classes y_t, with ``Z = sum_t p(y_t | x)`` and ``s(y)`` the sentence embedding of the
class's text (``label_text``: its WordNet lemmas, optionally with the WordNet definition and the
hypernym path, see :data:`LABEL_TEXTS`; ``label_template``, default ``"{}"``, wraps it); then
L2-normalized so that cosine similarity to any text embedding works as for CLIP. Default T = 10 (the paper's best
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
from oodscope.backbones.imagenet import imagenet_glosses, imagenet_hypernyms, imagenet_lemmas

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

#: How each ImageNet class is written before it is embedded (``label_text=``), e.g. for jersey:
#:
#: - ``"lemmas"``: ``jersey, T-shirt, tee shirt`` (every WordNet lemma);
#: - ``"lemmas+gloss"``: ``jersey, T-shirt, tee shirt: a close-fitting pullover shirt`` (+ the definition);
#: - ``"lemmas+hypernyms"``: ``jersey, T-shirt, tee shirt (shirt, garment, clothing, covering)``;
#: - ``"lemmas+gloss+hypernyms"``: both.
#:
#: Hypernyms: the path up WordNet's first-hypernym chain, nearest first, without the ancestors shared
#: by more than half of the 1,000 classes (entity, physical entity, object, whole, artifact), which
#: cannot tell classes apart. Definitions and paths: ``oodscope/data/imagenet_glosses.json``
#: (WordNet 3.0, scripts/build_imagenet_glosses.py).
LABEL_TEXTS = ("lemmas", "lemmas+gloss", "lemmas+hypernyms", "lemmas+gloss+hypernyms")
# Chosen by benchmarks/zero_shot_default.py on Fashion-MNIST-OOD and openclipart (docs/zero_shot.md):
# the best mean AUROC over both protocols, the four backbones and MCM / NegLabel / AdaNeg /
# label_vocabulary (59.8 against 59.5 for "lemmas": a tie within noise; with the chosen backbone
# conse:effnet-lite1 the margin is 63.5 against 60.6).
DEFAULT_LABEL_TEXT = "lemmas+gloss"


def imagenet_label_texts(label_text: str = DEFAULT_LABEL_TEXT) -> list[str]:
    """The 1,000 ImageNet class texts for one ``label_text`` option (before ``label_template``)."""
    if label_text not in LABEL_TEXTS:
        raise ValueError(f"label_text must be one of {', '.join(LABEL_TEXTS)}; got {label_text!r}")
    lemmas = [", ".join(lem) for lem in imagenet_lemmas()]
    if label_text == "lemmas":
        return lemmas
    glosses = imagenet_glosses()
    paths = imagenet_hypernyms()
    common = _common_ancestors(paths)
    texts = []
    for name, gloss, path in zip(lemmas, glosses, paths, strict=True):
        text = f"{name}: {gloss}" if "gloss" in label_text else name
        if "hypernyms" in label_text:
            kept = [h for h in path if h not in common]
            text += f" ({', '.join(kept)})" if kept else ""
        texts.append(text)
    return texts


def _common_ancestors(paths: list[list[str]]) -> set[str]:
    counts: dict[str, int] = {}
    for path in paths:
        for h in set(path):
            counts[h] = counts.get(h, 0) + 1
    return {h for h, n in counts.items() if n > len(paths) / 2}


class ConSE:
    """Vision-language backbone: ``encode_images`` and ``encode_texts`` share the sentence space."""

    def __init__(
        self,
        classifier: object,
        text_encoder: object,
        *,
        top_t: int = DEFAULT_TOP_T,
        label_template: str = DEFAULT_LABEL_TEMPLATE,
        label_text: str = DEFAULT_LABEL_TEXT,
        patches: bool = False,
        dense_grid: bool = False,
    ) -> None:
        if label_text not in LABEL_TEXTS:
            raise ValueError(f"label_text must be one of {', '.join(LABEL_TEXTS)}; got {label_text!r}")
        if top_t < 1:
            raise ValueError("top_t must be >= 1")
        if "{}" not in label_template:
            raise ValueError("label_template must contain '{}' for the class name")
        self.classifier = classifier
        self.text_encoder = text_encoder
        self.top_t = top_t
        self.label_template = label_template
        self.label_text = label_text
        self.want_patches = patches
        self.dense_grid = dense_grid
        options = []
        if top_t != DEFAULT_TOP_T:
            options.append(f"T={top_t}")
        if label_template != DEFAULT_LABEL_TEMPLATE:
            options.append("template=" + hashlib.sha1(label_template.encode()).hexdigest()[:8])
        if label_text != DEFAULT_LABEL_TEXT:
            options.append(f"text={label_text}")
        self.id = f"conse:{classifier.id}" + (f"?{'&'.join(options)}" if options else "")
        self.input_spec = classifier.input_spec
        self.device = classifier.device
        if patches or dense_grid:
            classifier.want_patches = True

    @cached_property
    def label_embeddings(self) -> torch.Tensor:
        """Sentence embeddings s(y) of the classifier's 1,000 class texts (:attr:`label_texts`).

        Encoding 1,000 names takes seconds to a minute on a CPU, so the result is memoized per
        process and stored on disk (``$OODSCOPE_CACHE/conse-labels``, else ``~/.cache/oodscope``),
        keyed by the text encoder's weights and the exact texts.
        """
        texts = self.label_texts
        key = hashlib.sha256("\n".join([self.text_encoder.weights_fingerprint(), *texts]).encode()).hexdigest()[:24]
        if key not in _LABEL_MEMO:
            _LABEL_MEMO[key] = _load_or_encode(key, texts, self.text_encoder)
        return _LABEL_MEMO[key]

    @cached_property
    def label_texts(self) -> list[str]:
        """The text embedded for each ImageNet class: ``label_template`` around the ``label_text`` option."""
        return [self.label_template.format(text) for text in imagenet_label_texts(self.label_text)]

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

    @property
    def text_space_encoder(self) -> object:
        """Texts are the sentence encoder's alone (not the classifier's nor the label texts'): the
        text-embedding cache keys them by it, so every ConSE variant shares one cache."""
        return self.text_encoder

    def classifier_parts(self):
        return self.classifier.classifier_parts()
