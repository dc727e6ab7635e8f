"""Shared base for zero-shot vision-language detectors (MCM, GL-MCM, NegLabel, EOE, AdaNeg, CLIPN).

These methods see no in-distribution images: they are built from the ID class *names*. They are
ordinary registered detectors (``create`` / ``score`` / ``save`` / ``load``) whose ``fit`` takes the
text side instead of ID features::

    det = create("mcm", classes=["cat", "dog"])
    det.fit(text_encoder=backbone)        # features may be None: nothing is learned from images
    scores = det.score(backbone_features)  # Features.embedding = L2-normalized image embeddings

``fit`` encodes the prompts (through the text-embedding cache of :mod:`oodscope.text.prompts`) and
stores every text embedding in ``state_``, so a saved detector scores without the text encoder.
Image embeddings are L2-normalized again inside, so scores do not depend on their norm.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from oodscope.detectors.base import Detector, DetectorError, FeatureInput
from oodscope.detectors.kinds import DetectorKind
from oodscope.text.prompts import TextEmbeddingCache, class_prompts, class_text_embeddings, encoder_key


class PromptDetector(Detector):
    """A detector whose fitted state is text embeddings of the ID class names (and maybe more text)."""

    kind: ClassVar[DetectorKind] = DetectorKind.ZERO_SHOT
    requires: ClassVar[tuple[str, ...]] = ("embedding",)
    needs_fit: ClassVar[bool] = True
    needs_labels: ClassVar[bool] = False
    score_batch_size: ClassVar[int] = 4096

    # ----------------------------------------------------------------- parameters
    #: ``templates`` default of the method (its paper's / official code's prompt set).
    default_templates: ClassVar[str | None] = "simple"

    @classmethod
    def inherited_parameters(cls) -> dict[str, Any]:
        return cls.prompt_parameters()

    @classmethod
    def prompt_parameters(cls) -> dict[str, Any]:
        """The prompt options every method built from class names takes (declared here once):

        ``templates`` — a named template set (``"simple"``: "a photo of a {}.", ``"ensemble"``: the
        CLIP ImageNet ensemble, ...) or a list of templates with ``{}``; ``custom_prompts`` — class
        name -> its own prompts (replacing the templates for that class); ``descriptions`` — class
        name -> descriptions appended to its prompts (see :mod:`oodscope.text.prompts`).
        """
        return {"templates": cls.default_templates, "custom_prompts": None, "descriptions": None}

    def _set_text_params(self, classes: Sequence[str], **prompt_options: Any) -> None:
        options = self.prompt_parameters() | prompt_options
        unknown = sorted(set(options) - set(self.prompt_parameters()))
        if unknown:
            raise DetectorError(f"{self.name}: unknown parameter(s) {', '.join(unknown)}")
        templates, custom_prompts, descriptions = options["templates"], options["custom_prompts"], \
            options["descriptions"]
        if isinstance(classes, str) or not isinstance(classes, Sequence):
            raise DetectorError(f"{self.name}: classes must be a list of class names")
        self.classes = list(classes)
        self.templates = templates if templates is None or isinstance(templates, str) else list(templates)
        self.custom_prompts = None if custom_prompts is None else {k: list(v) for k, v in custom_prompts.items()}
        self.descriptions = None if descriptions is None else {k: list(v) for k, v in descriptions.items()}
        try:  # fail at construction, not after minutes of encoding
            class_prompts(self.classes, self.templates, self.custom_prompts, self.descriptions)
        except (TypeError, ValueError) as err:
            raise DetectorError(f"{self.name}: {err}") from None

    # ----------------------------------------------------------------- fit
    def _fit_from(
        self,
        inputs: dict[str, torch.Tensor] | None,
        labels: torch.Tensor | None,
        *,
        text_encoder: Any = None,
        cache: TextEmbeddingCache | None = None,
        **options: Any,
    ) -> None:
        """Encode the text side with ``text_encoder``, then :meth:`_fit_images` (zero-shot: ID features,
        if given, are only checked for their dimension)."""
        self._check_labels(labels)
        self._fit_text(text_encoder, cache, **options)
        text = self.state_["class_text"]
        self.fit_info_["text_dim"] = int(text.shape[1])
        self.fit_info_["text_encoder"] = encoder_key(text_encoder) or type(text_encoder).__name__
        if inputs is not None:
            self._check_dim(inputs["embedding"])
            self._fit_images(inputs, labels)

    def _check_labels(self, labels: torch.Tensor | None) -> None:
        """Checks made before any text is encoded (few-shot methods: the label range)."""

    def _fit_images(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None) -> None:
        """What is learned from ID features after the text side (zero-shot: nothing)."""

    def _fit_text(self, encoder: Any, cache: TextEmbeddingCache | None) -> None:
        self.state_["class_text"] = self._encode_classes(encoder, cache)

    def _encode_classes(self, encoder: Any, cache: TextEmbeddingCache | None) -> torch.Tensor:
        emb = class_text_embeddings(
            encoder, self.classes, self.templates, self.custom_prompts, self.descriptions, cache=cache
        )
        return torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32))

    # ----------------------------------------------------------------- score
    def score(self, features: FeatureInput) -> np.ndarray:
        if not self.is_fitted_:
            raise DetectorError(
                f"{self.name}: call fit(text_encoder=backbone) first, to encode the class names"
            )
        return super().score(features)

    def _check_dim(self, x: torch.Tensor) -> None:
        dim = int(self.state_["class_text"].shape[1])
        if x.shape[-1] != dim:
            raise DetectorError(
                f"{self.name}: image embeddings have dimension {x.shape[-1]} but the text embeddings have {dim}; "
                "the features must come from the backbone whose text encoder was used in fit"
            )

    def _unit(self, x: torch.Tensor) -> torch.Tensor:
        """Checked, L2-normalized image (or patch) embeddings."""
        self._check_dim(x)
        return torch.nn.functional.normalize(x, dim=-1)

    def _cosines(self, x: torch.Tensor, name: str = "class_text") -> torch.Tensor:
        """Cosine similarities of normalized embeddings (..., D) to the stored texts ``name`` (T, D)."""
        return self._unit(x) @ self._state(name, x).T


# --------------------------------------------------------------------------- shared formulas
def max_softmax(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return torch.softmax(logits, dim=dim).amax(dim=dim)


def make_groups(count: int, ngroups: int, seed: int) -> np.ndarray:
    """Random split of ``count`` negatives into ``min(ngroups, count)`` groups of near-equal size.

    A seeded permutation is cut into contiguous blocks; every group is non-empty.
    """
    if ngroups < 1:
        raise DetectorError("ngroups must be >= 1")
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    groups = min(ngroups, count)
    perm = np.random.default_rng(seed).permutation(count)
    out = np.empty(count, dtype=np.int64)
    out[perm] = (np.arange(count) * groups) // count
    return out


def grouped_id_mass(pos: torch.Tensor, neg: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """NegLabel's score: mean over groups g of  sum_ID e^l / (sum_ID e^l + sum_{neg in g} e^l).

    ``pos`` (N, K) and ``neg`` (N, M) are logits (cosine / temperature), ``group`` (M,) the group of
    each negative (``-1``: left out, as the official code drops ``M mod ng`` negatives). Computed in
    log space so that far-apart logits (temperature 0.01) cannot give 0/0. With no negatives the ID
    mass is 1 for every image.
    """
    used = group >= 0
    if not bool(used.all()):
        neg, group = neg[:, used.to(neg.device)], group[used]
    n, m = neg.shape
    if m == 0:
        return torch.ones(n, dtype=pos.dtype, device=pos.device)
    groups = int(group.max().item()) + 1
    log_p = torch.logsumexp(pos, dim=1, keepdim=True)
    index = group.to(neg.device).unsqueeze(0).expand(n, m)
    gmax = torch.full((n, groups), -torch.inf, dtype=neg.dtype, device=neg.device)
    gmax = gmax.scatter_reduce(1, index, neg, reduce="amax", include_self=True)
    total = torch.zeros_like(gmax).scatter_add(1, index, torch.exp(neg - gmax.gather(1, index)))
    log_q = torch.log(total) + gmax
    # P / (P + Q) = sigmoid(log P - log Q)
    return torch.sigmoid(log_p - log_q).mean(dim=1)


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) along the last axis."""
    log_p = torch.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)
