"""CSP — Conjugated Semantic Pool: NegLabel with adjective-modified superclass names (zero-shot).

Chen, Gao & Xu, "Conjugated Semantic Pool Improves OOD Detection with Pre-trained Vision-Language
Models", NeurIPS 2024.

Score (NegLabel's): ``S = -mean_g sum_ID e^{cos/tau} / (sum_ID e^{cos/tau} + sum_{neg in g} e^{cos/tau})``
over ``ng`` random groups of the negatives. What CSP changes is the pool the negatives are mined from:
besides WordNet nouns, every adjective becomes a *conjugated* label, "<adjective> <superclass>"
("unheard environment", "lively creature"), whose superclass word is drawn at random from 14
(``csp_templates``); such a label sits between many categories sharing a property, so images of
unseen classes land near it.

Official code: MengyuanChen21/NeurIPS2024-CSP, ``mmcls/models/classifiers/multi_modal.py``
(``CLIPScalableClassifier``) with ``custom_config/clip-ViT-B16.py`` and the lists of
``mmcls/models/classifiers/class_names.py``; score ``mmcls/models/ood/clip_ood.py``
(``ScalableClassifier.grouping``). Defaults from there:

- corpus: NegLabel's WordNet word files without ``noun.person``, ``noun.quantity``, ``noun.group``
  and ``adj.pert`` (``txt_exclude``); here the shipped head-word corpus
  (:data:`oodscope.text.lexicon.OFFICIAL_CORPUS`, already without ``noun.animal`` / ``noun.food``) with
  those four categories left out too (:data:`CSP_EXCLUDED_CATEGORIES`);
- conjugation: ``random.seed(seed)``, then for each adjective in corpus order
  ``random.choice(csp_templates).format(adjective)`` (Python's ``random``, as the code);
- prompts (ensembles): ID classes and nouns the 8 ``preset_noun_prompt_templates``
  ("a close-up photo of the nice {}.", ..., "the nice {}"), conjugated labels the 4
  ``preset_adj_prompt_templates`` ("{}", "a nice photo of {}", ...);
- mining: each candidate's 0.95-quantile of cosines to the ID prompts (``pencentile=0.95``, eta =
  0.05), set to 1 (ranked last) when its largest cosine exceeds ``max_id_similarity = 0.95``; the
  nearest-to-nothing ``floor(0.15 n)`` of each part of speech kept (``neg_topk=0.15``), nouns first;
- score: ``ng = 100`` groups (the last ``M mod ng`` dropped, the rest permuted by ``torch.randperm``),
  tau = 0.01 (``t=1`` on cosines times 100).

Departures: the corpus is oodscope's WordNet 3.0 head-word list (not the released files; see
:mod:`oodscope.text.lexicon`), read in sorted order per category (the official code reads
``os.listdir`` order, so which adjective gets which superclass differs while the rule is the same);
a word that is both a noun and an adjective is a noun; the ID class names are removed from the pool
(NegLabel's rule; CSP's code keeps them, where the 0.95 rule ranks them last, so its 15 % is taken of
a pool larger by the ID names found in WordNet); a prompt ensemble is the mean of the *normalized*
prompt embeddings (the code averages raw CLIP outputs; oodscope's text encoders return unit
vectors); the group permutation is CPU torch's (the code draws it on the GPU).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from oodscope.detectors.base import DetectorError, parameters, register
from oodscope.detectors.neglabel import (
    CORPORA,
    NEGLABEL_RECIPES,
    RECIPE_KEYS,
    NegLabel,
    mine_negatives,
    negative_groups,
    per_pos_takes,
)
from oodscope.text.lexicon import Lexicon, wordnet_lexicon
from oodscope.text.prompts import TextEmbeddingCache, class_text_embeddings

#: ``preset_noun_prompt_templates`` of the official ``class_names.py`` (ID classes and noun negatives).
NOUN_TEMPLATES: tuple[str, ...] = (
    "a close-up photo of the nice {}.", "a photo with the nice {}.", "a good photo with the nice {}.",
    "a photo of the nice {}.", "{}", "the {}", "the good {}", "the nice {}",
)
#: ``preset_adj_prompt_templates``: prompts of a conjugated label.
ADJECTIVE_TEMPLATES: tuple[str, ...] = ("{}", "a nice photo of {}", "a good photo of {}", "a close-up photo of {}")
#: ``csp_templates``: the superclass words an adjective is conjugated with.
CONJUGATION_TEMPLATES: tuple[str, ...] = (
    "{} environment", "{} space", "{} object", "{} scene", "{} place", "{} item", "{} area", "{} view",
    "{} thing", "{} pattern", "{} structure", "{} landscape", "{} vista", "{} creature",
)
#: ``txt_exclude`` of the official config (besides noun.animal / noun.food, absent from NegLabel's files).
CSP_EXCLUDED_CATEGORIES: tuple[str, ...] = ("noun.person", "noun.quantity", "noun.group", "adj.pert")

#: CSP's settings besides NegLabel's (each also a parameter; ``None`` there means "the recipe's").
CSP_KEYS = ("noun_templates", "adjective_templates", "conjugation_templates")

CSP_RECIPES: dict[str, dict[str, Any]] = {
    "official": {
        **NEGLABEL_RECIPES["official"],
        "templates": NOUN_TEMPLATES,
        # NegLabel's single-template settings are not used by CSP (its prompts are ensembles).
        "noun_template": "{}", "adjective_template": "{}",
        "noun_templates": NOUN_TEMPLATES, "adjective_templates": ADJECTIVE_TEMPLATES,
        "conjugation_templates": CONJUGATION_TEMPLATES,
        "exclude_categories": CSP_EXCLUDED_CATEGORIES,
    },
}


@register
class CSP(NegLabel):
    """CSP (Chen, Gao & Xu, NeurIPS 2024): NegLabel over a pool with conjugated "<adjective>
    <superclass>" labels. ``S = -mean_g S_ID / (S_ID + S_g)`` as NegLabel; defaults and departures in
    the module docstring (official code MengyuanChen21/NeurIPS2024-CSP)."""

    name = "csp"
    recipes: ClassVar[dict[str, dict[str, Any]]] = CSP_RECIPES

    @classmethod
    def inherited_parameters(cls) -> dict[str, Any]:
        """NegLabel's parameters but its single-template prompts (CSP's are the ensembles below)."""
        skip = {"classes", "noun_template", "adjective_template"}
        return {k: v for k, v in parameters(NegLabel).items() if k not in skip}

    def __init__(
        self,
        classes: Sequence[str],
        noun_templates: Sequence[str] | None = None,
        adjective_templates: Sequence[str] | None = None,
        conjugation_templates: Sequence[str] | None = None,
        max_id_similarity: float = 0.95,
        **neglabel_options: Any,
    ) -> None:
        for key in ("noun_template", "adjective_template"):
            if key in neglabel_options:
                raise DetectorError(f"{self.name}: unknown parameter {key}; use {key}s (a list of templates)")
        super().__init__(classes, **neglabel_options)
        self.noun_templates = None if noun_templates is None else list(noun_templates)
        self.adjective_templates = None if adjective_templates is None else list(adjective_templates)
        self.conjugation_templates = None if conjugation_templates is None else list(conjugation_templates)
        for key in CSP_KEYS:
            templates = self.setting(key)
            if isinstance(templates, str) or not templates or any(
                not isinstance(t, str) or t.count("{}") != 1 for t in templates
            ):
                raise DetectorError(f"{self.name}: {key} must be a list of templates each containing '{{}}' once")
        if not 0.0 < max_id_similarity <= 1.0:
            raise DetectorError(f"{self.name}: max_id_similarity must be in (0, 1]")
        self.max_id_similarity = max_id_similarity

    def setting(self, key: str) -> Any:
        if key in CSP_KEYS:
            value = getattr(self, key, None)
            return tuple(self.recipes[self.recipe][key] if value is None else value)
        return super().setting(key)

    # ----------------------------------------------------------------- the pool
    def _candidates(self, lexicon: Lexicon | None) -> Lexicon:
        """WordNet nouns and conjugated adjectives (``lexicon``, when given, replaces the corpus: its
        adjectives are conjugated too)."""
        if lexicon is None and self.setting("corpus") in CORPORA:
            options = CORPORA[self.setting("corpus")] | dict(self.corpus_options or {})
            options["exclude_categories"] = tuple(options.get("exclude_categories", ())) + tuple(
                c for c in self.recipes[self.recipe]["exclude_categories"]
                if c not in options.get("exclude_categories", ())
            )
            options["exclude"] = list(options.get("exclude", [])) + list(self.classes)
            lexicon = wordnet_lexicon(**options)
        return conjugate(super()._candidates(lexicon), self.setting("conjugation_templates"), self.seed)

    def _encode_words(self, encoder: Any, lexicon: Lexicon, cache: TextEmbeddingCache | None) -> torch.Tensor:
        """Prompt-ensemble embeddings: nouns with ``noun_templates``, conjugated labels with
        ``adjective_templates``."""
        dim = int(self.state_["class_text"].shape[1])
        out = torch.zeros((len(lexicon), dim), dtype=torch.float32)
        pos = np.asarray(lexicon.pos, dtype=object)
        for part, key in (("noun", "noun_templates"), ("adj", "adjective_templates")):
            rows = np.flatnonzero(pos == part)
            if len(rows):
                words = [lexicon.words[i] for i in rows]
                emb = ensemble_embeddings(encoder, words, self.setting(key), cache)
                if emb.shape[1] != dim:
                    raise DetectorError(f"{self.name}: negative embeddings have dimension {emb.shape[1]}, not {dim}")
                out[torch.as_tensor(rows)] = emb
        return out

    # ----------------------------------------------------------------- fit: mining
    def _fit_text(self, encoder: Any, cache: TextEmbeddingCache | None, lexicon: Lexicon | None = None) -> None:
        if self.negatives is not None:  # given negatives: nothing to mine (NegLabel's path, CSP's prompts)
            super()._fit_text(encoder, cache, lexicon)
            return
        id_text = self._encode_classes(encoder, cache)
        self.state_["class_text"] = id_text
        candidates = self._candidates(lexicon)
        cand_text = self._encode_words(encoder, candidates, cache)
        order = self._mine(cand_text, id_text, candidates)
        chosen = Lexicon(tuple(candidates.words[i] for i in order), tuple(candidates.pos[i] for i in order))
        self.fit_info_["num_candidates"] = len(candidates)
        self.fit_info_["num_candidates_by_pos"] = {p: candidates.pos.count(p) for p in ("noun", "adj")}
        self._set_negatives(chosen, cand_text[torch.as_tensor(order, dtype=torch.long)])

    def _mine(self, cand_text: torch.Tensor, id_text: torch.Tensor, candidates: Lexicon) -> np.ndarray:
        """Indices of the negatives: :func:`select_conjugated` with the recipe's settings."""
        return select_conjugated(
            cand_text, id_text, candidates.pos, self.setting("num_negatives"), self.eta,
            max_id_similarity=self.max_id_similarity, pos_order=self.setting("pos_order"),
            quantile=self.setting("quantile"),
        )

    def _set_negatives(self, chosen: Lexicon, neg_text: torch.Tensor) -> None:
        """Store the negatives in use, their groups and what the fit used."""
        self.state_["negative_text"] = neg_text.contiguous()
        self.state_["negative_group"] = torch.from_numpy(
            negative_groups(len(chosen), self.ngroups, self.seed, self.setting("grouping"))
        )
        self.fit_info_["negative_words"] = list(chosen.words)
        self.fit_info_["negative_pos"] = list(chosen.pos)
        keys = (*(k for k in RECIPE_KEYS if k not in ("noun_template", "adjective_template")), *CSP_KEYS,
                "quantile", "pos_order", "grouping")
        self.fit_info_["recipe"] = {k: _jsonable(self.setting(k)) for k in keys}
        self.fit_info_["recipe"]["exclude_categories"] = list(self.recipes[self.recipe]["exclude_categories"])


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def conjugate(lexicon: Lexicon, templates: Sequence[str], seed: int) -> Lexicon:
    """CSP's pool: nouns as they are; each adjective, in order, becomes
    ``random.choice(templates).format(adjective)`` after ``random.seed(seed)`` (Python's ``random``, as
    the official code). Duplicated conjugated labels are kept once."""
    rng = random.Random(seed)
    words, parts, seen = [], [], set()
    for word, pos in zip(lexicon.words, lexicon.pos, strict=True):
        label = rng.choice(list(templates)).format(word) if pos == "adj" else word
        if (label, pos) not in seen:
            seen.add((label, pos))
            words.append(label)
            parts.append(pos)
    return Lexicon(tuple(words), tuple(parts))


def ensemble_embeddings(
    encoder: Any, words: Sequence[str], templates: Sequence[str], cache: TextEmbeddingCache | None
) -> torch.Tensor:
    """(len(words), D) float32: each word's prompt ensemble over ``templates``
    (:func:`oodscope.text.prompts.class_text_embeddings`); repeated words share one row."""
    unique = list(dict.fromkeys(words))
    emb = class_text_embeddings(encoder, unique, list(templates), cache=cache)
    row = {w: i for i, w in enumerate(unique)}
    index = torch.as_tensor([row[w] for w in words], dtype=torch.long)
    return torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32))[index]


def select_conjugated(
    candidates: torch.Tensor, id_text: torch.Tensor, pos: Sequence[str], count: int | float, eta: float, *,
    max_id_similarity: float = 0.95, pos_order: Sequence[str] = ("noun", "adj"), quantile: str = "linear",
) -> np.ndarray:
    """CSP's mining, each part of speech on its own (in ``pos_order``), farthest first: the
    (1-eta)-quantile of a candidate's cosines to the ID texts, set to 1 when its largest cosine
    exceeds ``max_id_similarity``; ``floor(count * n_pos)`` kept of each part (a float ``count``,
    ``neg_topk``), or an int ``count`` split in proportion to the parts' sizes. The candidates set to 1
    are ranked after all others (they are taken only if nothing else is left)."""
    members, takes = per_pos_takes(pos, count)
    ids = torch.nn.functional.normalize(id_text.double(), dim=1)
    out = []
    for p in pos_order:
        idx = members[p]
        if not len(idx) or not takes[p]:
            continue
        near = _max_cosine(candidates[torch.as_tensor(idx)], ids) > max_id_similarity
        far, close = idx[~near], idx[near]
        picked = far[mine_negatives(candidates[torch.as_tensor(far)], id_text, takes[p], eta, quantile=quantile)] \
            if len(far) else np.zeros(0, dtype=np.int64)
        rest = takes[p] - len(picked)
        if rest > 0 and len(close):  # official: sim = 1 for all of them, argsort keeps their order
            picked = np.concatenate([picked, close[:rest]])
        out.append(picked)
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, dtype=np.int64)


def _max_cosine(candidates: torch.Tensor, unit_ids: torch.Tensor) -> np.ndarray:
    """Largest cosine of each candidate to the (normalized) ID texts, in blocks of bounded size."""
    rows = max(1, (1 << 22) // max(len(unit_ids), 1))
    out = [
        (torch.nn.functional.normalize(candidates[s : s + rows].double(), dim=1) @ unit_ids.T).amax(dim=1)
        for s in range(0, len(candidates), rows)
    ]
    return torch.cat(out).numpy() if out else np.zeros(0)
