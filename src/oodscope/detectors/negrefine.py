"""NegRefine — refined negative labels and a multi-matching-aware score (zero-shot).

Ansari, Wang & Xiong, "NegRefine: Refining Negative Label-Based Zero-Shot OOD Detection", ICCV 2025.

1. Negatives: CSP's pool and mining (:mod:`oodscope.detectors.csp`) with ``pencentile = 1`` (eta = 0:
   a candidate's distance is its largest cosine to the ID prompts) and the ID names removed, then
   *filtered*: words cleaned (letters, ``_``, ``-`` and spaces kept; fewer than 3 characters dropped),
   and labels that are proper nouns or sub-categories / synonyms of an ID class removed.
2. Score: ``S(x) = S_NegLabel(x) + w * max_{p in top_kp ID, n in top_kn neg} e^{c(x, "p and n")/tau} /
   (e^{c(x, "p and n")/tau} + e^{c(x, n)/tau})`` — an image that matches an ID label *and* a
   negative (two objects) is not taken for OOD because of the negative alone; OOD score = ``-S``.

Official code: ah-ansari/NegRefine, ``src/clip_ood.py`` (``CLIPood``: ``k_pos = min(5, K)``,
``k_neg = 5``, ``ngroup = 100``, ``detection_score = neg_label_score + 2 * multi_matching_score``,
"p and n" prompted with the noun templates), ``src/create_negs.py`` (``neg_top_p = 0.15``,
``pencentile = 1``, CSP's ``txt_exclude``, templates and 0.95 rule), ``src/neg_filter.py``
(``_clean_words``; the LLM, Qwen2.5-14B-Instruct-1M, asked "Is 'n' a proper noun ...?" and "Is 'n' a
subcategory of 'p'?" for the 10 ID labels closest to n). tau = 0.01 (cosines times 100).

**Departure — the filter (part 1) uses WordNet, not an LLM** (no LLM offline): a noun label is
removed when it is a lemma of a synset of an ID class name (a synonym) or of any synset below one
(a sub-category: transitive hyponyms, all senses of the name, instances included), checked against
every ID class rather than the 10 closest; or when WordNet writes it only with an upper-case letter
(a proper noun; this also catches eponyms and acronyms, "Charcot-Marie-Tooth disease", "phase IV
clinical trial"; :mod:`oodscope.text.wordnet_graph`, ``data/wordnet_nouns.txt``). An ID name matches WordNet as
it is, by its ``/``-separated parts, or without a parenthesised note. Conjugated adjective labels
("<adjective> <superclass>") are only cleaned: WordNet has no hyponymy for them (the LLM rarely
removes them). The LLM's judgement differs from WordNet's both ways (it knows brands and recent
names; WordNet knows every rare sense, e.g. all clothing is a hyponym of one sense of "dress").
Other departures: the cleaned labels keep the mined order (the code's ``list(set(...))`` order varies
per process); the rest as CSP (prompt ensembles of normalized embeddings, CPU group permutation).

The "p and n" texts are encoded with the text encoder of ``fit``: all ``K x M`` of them during fit
when ``pair_texts="all"`` (or ``"auto"`` and ``K x M <= 20,000``), else (``"lazy"``) when an image
first needs them, through the text cache, kept in ``state_`` so that a saved detector scores the
images it has seen without the encoder (for others, :meth:`NegRefine.attach_text_encoder`). Both
give the same scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from oodscope.detectors._zeroshot import grouped_id_mass
from oodscope.detectors.base import DetectorError, parameters, register
from oodscope.detectors.csp import CSP, ensemble_embeddings
from oodscope.text.lexicon import Lexicon
from oodscope.text.prompts import TextEmbeddingCache
from oodscope.text.wordnet_graph import load_noun_hierarchy, related_to_classes

PAIR_TEXTS = ("auto", "all", "lazy")
AUTO_PAIR_LIMIT = 20000


@register
class NegRefine(CSP):
    """NegRefine (Ansari, Wang & Xiong, ICCV 2025): CSP negatives filtered (WordNet here, an LLM in the
    paper) and ``S = S_NegLabel + 2 max_{p,n} e^{c(x,"p and n")/tau} / (e^{c(x,"p and n")/tau} +
    e^{c(x,n)/tau})``, OOD score ``-S``; defaults and departures in the module docstring."""

    name = "negrefine"

    @classmethod
    def inherited_parameters(cls) -> dict[str, Any]:
        """CSP's parameters (its prompt ensembles, NegLabel's mining and grouping), taken as they are."""
        return {k: v for k, v in parameters(CSP).items() if k != "classes"}

    def __init__(
        self,
        classes: Sequence[str],
        eta: float = 0.0,
        multi_matching_weight: float = 2.0,
        top_classes: int = 5,
        top_negatives: int = 5,
        refine: bool = True,
        pair_texts: str = "auto",
        **csp_options: Any,
    ) -> None:
        super().__init__(classes, eta=eta, **csp_options)
        if top_classes < 1 or top_negatives < 1:
            raise DetectorError(f"{self.name}: top_classes and top_negatives must be >= 1")
        if pair_texts not in PAIR_TEXTS:
            raise DetectorError(f"{self.name}: pair_texts must be one of {PAIR_TEXTS}, got {pair_texts!r}")
        self.multi_matching_weight = multi_matching_weight
        self.top_classes = top_classes
        self.top_negatives = top_negatives
        self.refine = bool(refine)
        self.pair_texts = pair_texts
        self._pair_encoder: Any = None
        self._pair_cache: TextEmbeddingCache | None = None

    # ----------------------------------------------------------------- fit
    def _fit_text(self, encoder: Any, cache: TextEmbeddingCache | None, lexicon: Lexicon | None = None) -> None:
        super()._fit_text(encoder, cache, lexicon)
        if self.refine:
            mined = Lexicon(tuple(self.fit_info_["negative_words"]), tuple(self.fit_info_["negative_pos"]))
            kept, removed = refine_negatives(mined, self.classes)
            self.fit_info_["num_initial_negatives"] = len(mined)
            self.fit_info_["removed"] = removed
            self._set_negatives(kept, self._encode_words(encoder, kept, cache))
        self._pair_encoder, self._pair_cache = encoder, cache
        k, m = len(self.classes), len(self.fit_info_["negative_words"])
        dim = int(self.state_["class_text"].shape[1])
        self.state_["pair_ids"] = torch.zeros(0, dtype=torch.long)
        self.state_["pair_text"] = torch.zeros((0, dim), dtype=torch.float32)
        if self.pair_texts == "all" or (self.pair_texts == "auto" and k * m <= AUTO_PAIR_LIMIT):
            self._pair_embeddings(torch.arange(k * m, dtype=torch.long))

    def attach_text_encoder(self, encoder: Any, cache: TextEmbeddingCache | None = None) -> NegRefine:
        """Give a loaded detector the text encoder of its fit, to encode "p and n" texts it has not seen."""
        if not callable(getattr(encoder, "encode_texts", None)):
            raise DetectorError(f"{self.name}: the text encoder must have encode_texts(list[str])")
        self._pair_encoder, self._pair_cache = encoder, cache
        return self

    def _pair_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of the "p and n" texts of pair ids ``p * M + n`` (encoded once, kept in ``state_``)."""
        m = len(self.fit_info_["negative_words"])
        known = self.state_["pair_ids"]
        wanted = torch.unique(ids.cpu())
        pos = torch.searchsorted(known, wanted).clamp_max(max(len(known) - 1, 0))
        missing = wanted if len(known) == 0 else wanted[known[pos] != wanted]
        if len(missing):
            if self._pair_encoder is None:
                raise DetectorError(
                    f"{self.name}: {len(missing)} 'class and negative' texts were never encoded; give the detector "
                    "its text encoder with attach_text_encoder(backbone) (or fit it with pair_texts='all')"
                )
            words = self.fit_info_["negative_words"]
            texts = [f"{self.classes[int(i) // m]} and {words[int(i) % m]}" for i in missing]
            emb = ensemble_embeddings(self._pair_encoder, texts, self.setting("noun_templates"), self._pair_cache)
            ids_all = torch.cat([known, missing])
            order = torch.argsort(ids_all)
            self.state_["pair_ids"] = ids_all[order].contiguous()
            self.state_["pair_text"] = torch.cat([self.state_["pair_text"], emb])[order].contiguous()
            known = self.state_["pair_ids"]
        return self.state_["pair_text"][torch.searchsorted(known, ids.cpu())]

    # ----------------------------------------------------------------- score
    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = inputs["embedding"]
        pos, neg = self._logits(x)
        s_neg = grouped_id_mass(pos, neg, self._groups(pos))
        if neg.shape[1] == 0:
            return -s_neg
        unit = self._unit(x)
        m = neg.shape[1]
        top_p = pos.topk(min(self.top_classes, pos.shape[1]), dim=1).indices  # (N, kp)
        neg_val, top_n = neg.topk(min(self.top_negatives, m), dim=1)  # (N, kn)
        ids = top_p.unsqueeze(2) * m + top_n.unsqueeze(1)  # (N, kp, kn)
        pair = self._pair_embeddings(ids.reshape(-1)).to(unit.device, unit.dtype).view(*ids.shape, -1)
        logit = torch.einsum("nd,npkd->npk", unit, pair) / self.temperature
        # e^a / (e^a + e^b) = sigmoid(a - b)
        matching = torch.sigmoid(logit - neg_val.unsqueeze(1)).amax(dim=(1, 2))
        return -(s_neg + self.multi_matching_weight * matching)


def clean_label(label: str) -> str:
    """``_clean_words`` of the official ``neg_filter.py`` for one label: keep letters, ``_``, ``-``
    and spaces ("" when fewer than 3 characters remain)."""
    kept = "".join(c for c in label if c.isalpha() or c in {"_", "-", " "})
    return kept if len(kept) > 2 else ""


def refine_negatives(negatives: Lexicon, classes: Sequence[str], source: str = "auto") -> tuple[Lexicon, dict]:
    """NegRefine's filter with WordNet for the LLM: cleaned, de-duplicated labels (in order), without
    nouns that are synonyms / sub-categories of an ID class or proper nouns. Returns the kept labels
    and the removed ones by reason."""
    related = related_to_classes(classes, source)
    proper = load_noun_hierarchy(source).proper_nouns
    words, parts, seen = [], [], set()
    removed: dict[str, list[str]] = {"unclean": [], "proper_noun": [], "subcategory_or_synonym": []}
    for word, pos in zip(negatives.words, negatives.pos, strict=True):
        label = clean_label(word)
        if not label:
            removed["unclean"].append(word)
            continue
        if (label, pos) in seen:
            continue
        key = " ".join(label.replace("_", " ").split())
        if pos == "noun" and key in proper:
            removed["proper_noun"].append(label)
            continue
        if pos == "noun" and key in related:
            removed["subcategory_or_synonym"].append(label)
            continue
        seen.add((label, pos))
        words.append(label)
        parts.append(pos)
    return Lexicon(tuple(words), tuple(parts)), removed

