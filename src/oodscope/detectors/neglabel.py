"""NegLabel — negative labels mined from a large corpus (zero-shot, vision-language).

Jiang, Liu, Fang, Chen, Liu, Zheng, Han, "Negative Label Guided OOD Detection with Pretrained
Vision-Language Models", ICLR 2024.

Mining (NegMining): for each candidate word c, the distance to the ID labels is the eta-percentile of
{-cos(c, t_k)}_k, i.e. minus the (1-eta)-quantile of its cosines to the ID label embeddings; the M
candidates with the largest distance become the negative labels.
Score: ``S = sum_ID e^{cos/tau} / (sum_ID e^{cos/tau} + sum_neg e^{cos/tau})``, computed separately for
ng random groups of the negatives and averaged (grouping strategy); OOD score = ``-S``.
Defaults (paper / official code XueJiang16/NegLabel): M = 10,000, eta = 0.05 (the code's 0.95
quantile of similarities), ng = 100, tau = 0.01 (the code multiplies cosines by 100). Corpus: WordNet
nouns and adjectives (oodscope's packaged list, :mod:`oodscope.text.lexicon`). Differences from the
code: the M negatives are chosen jointly over nouns and adjectives (the code keeps the lowest 15% of
each part of speech separately), groups are near-equal contiguous blocks of a seeded permutation
(the code drops M mod ng negatives), and the prompts are ours: nouns "a photo of a {}." (the ID
template, as in the paper), adjectives "a {} photo.".
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oodscope.detectors._zeroshot import PromptDetector, grouped_id_mass, make_groups
from oodscope.detectors.base import DetectorError, register
from oodscope.text.lexicon import Lexicon, read_word_file, wordnet_lexicon, write_word_file
from oodscope.text.prompts import TextEmbeddingCache, encode_texts


@register
class NegLabel(PromptDetector):
    name = "neglabel"
    fit_options = ("lexicon",)  # a Lexicon to mine negatives from instead of the corpus
    score_batch_size = 1024  # (rows x 10k negatives) intermediates

    def __init__(
        self,
        classes: Sequence[str],
        num_negatives: int = 10000,
        eta: float = 0.05,
        ngroups: int = 100,
        temperature: float = 0.01,
        seed: int = 0,
        noun_template: str = "a photo of a {}.",
        adjective_template: str = "a {} photo.",
        corpus: str = "wordnet",
        corpus_options: Mapping[str, Any] | None = None,
        negatives: str | Sequence[str] | None = None,
        **prompt_options: Any,
    ) -> None:
        super().__init__()
        self._set_text_params(classes, **prompt_options)
        if num_negatives < 0:
            raise DetectorError(f"{self.name}: num_negatives must be >= 0")
        if not 0.0 <= eta <= 1.0:
            raise DetectorError(f"{self.name}: eta must be in [0, 1]")
        if ngroups < 1:
            raise DetectorError(f"{self.name}: ngroups must be >= 1")
        if not temperature > 0:
            raise DetectorError(f"{self.name}: temperature must be > 0")
        for template in (noun_template, adjective_template):
            if template.count("{}") != 1:
                raise DetectorError(f"{self.name}: template {template!r} must contain '{{}}' exactly once")
        self.num_negatives = num_negatives
        self.eta = eta
        self.ngroups = ngroups
        self.temperature = temperature
        self.seed = seed
        self.noun_template = noun_template
        self.adjective_template = adjective_template
        self.corpus = corpus
        self.corpus_options = None if corpus_options is None else dict(corpus_options)
        self.negatives = negatives if negatives is None or isinstance(negatives, str) else list(negatives)

    # ----------------------------------------------------------------- fit: mining
    def _fit_text(
        self, encoder: Any, cache: TextEmbeddingCache | None, lexicon: Lexicon | None = None
    ) -> None:
        """``lexicon`` (optional) replaces the corpus as the mining candidates."""
        id_text = self._encode_classes(encoder, cache)
        self.state_["class_text"] = id_text
        if self.negatives is not None:
            if lexicon is not None:
                raise DetectorError(f"{self.name}: give either negatives=... or a lexicon to mine, not both")
            chosen = self._fixed_negatives()
            neg_text = self._encode_words(encoder, chosen, cache)
            self.fit_info_["num_candidates"] = len(chosen)
        else:
            candidates = self._candidates(lexicon)
            cand_text = self._encode_words(encoder, candidates, cache)
            order = mine_negatives(cand_text, id_text, self.num_negatives, self.eta)
            chosen = Lexicon(
                tuple(candidates.words[i] for i in order), tuple(candidates.pos[i] for i in order)
            )
            neg_text = cand_text[torch.as_tensor(order, dtype=torch.long)]
            self.fit_info_["num_candidates"] = len(candidates)
        self.state_["negative_text"] = neg_text.contiguous()
        self.state_["negative_group"] = torch.from_numpy(make_groups(len(chosen), self.ngroups, self.seed))
        self.fit_info_["negative_words"] = list(chosen.words)
        self.fit_info_["negative_pos"] = list(chosen.pos)

    def _candidates(self, lexicon: Lexicon | None) -> Lexicon:
        excluded = {c.strip().lower() for c in self.classes}
        if lexicon is None:
            options = dict(self.corpus_options or {})
            if self.corpus == "wordnet":
                options["exclude"] = list(options.get("exclude", [])) + list(self.classes)
                lexicon = wordnet_lexicon(**options)
            elif os.path.isfile(self.corpus):
                if options:
                    raise DetectorError(f"{self.name}: corpus_options only apply to corpus='wordnet'")
                lexicon = read_word_file(self.corpus)
            else:
                raise DetectorError(f"{self.name}: corpus must be 'wordnet' or a word-list file, got {self.corpus!r}")
        # An ID class name is never its own negative.
        keep = [i for i, w in enumerate(lexicon.words) if w.strip().lower() not in excluded]
        return Lexicon(tuple(lexicon.words[i] for i in keep), tuple(lexicon.pos[i] for i in keep))

    def _fixed_negatives(self) -> Lexicon:
        if isinstance(self.negatives, str):
            if not Path(self.negatives).is_file():
                raise DetectorError(f"{self.name}: negatives file {self.negatives!r} not found")
            return read_word_file(self.negatives)
        words, parts = [], []
        for item in self.negatives:
            word, _, part = item.partition("\t")
            words.append(word.strip())
            parts.append(part.strip() or "noun")
        return Lexicon(tuple(words), tuple(parts))

    def _encode_words(self, encoder: Any, lexicon: Lexicon, cache: TextEmbeddingCache | None) -> torch.Tensor:
        texts = [
            (self.noun_template if pos == "noun" else self.adjective_template).format(word)
            for word, pos in zip(lexicon.words, lexicon.pos, strict=True)
        ]
        dim = int(self.state_["class_text"].shape[1])
        if not texts:
            return torch.zeros((0, dim), dtype=torch.float32)
        emb = torch.from_numpy(np.ascontiguousarray(encode_texts(encoder, texts, cache=cache), dtype=np.float32))
        if emb.shape[1] != dim:
            raise DetectorError(f"{self.name}: negative text embeddings have dimension {emb.shape[1]}, not {dim}")
        return emb

    # ----------------------------------------------------------------- negatives as a text file
    @property
    def negative_lexicon(self) -> Lexicon:
        """The negative labels in use (words and parts of speech)."""
        if not self.is_fitted_:
            raise DetectorError(f"{self.name}: not fitted")
        return Lexicon(tuple(self.fit_info_["negative_words"]), tuple(self.fit_info_["negative_pos"]))

    def export_negatives(self, path: str | os.PathLike) -> Path:
        """Write the mined negatives as ``word<TAB>pos`` lines; reuse with ``negatives=path``."""
        return write_word_file(path, self.negative_lexicon)

    # ----------------------------------------------------------------- score
    def _logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        unit = self._unit(x)
        pos = unit @ self._state("class_text", unit).T / self.temperature
        neg = unit @ self._state("negative_text", unit).T / self.temperature
        return pos, neg

    def _groups(self, like: torch.Tensor) -> torch.Tensor:
        return self.state_["negative_group"].to(device=like.device, dtype=torch.long)

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        pos, neg = self._logits(inputs["embedding"])
        return -grouped_id_mass(pos, neg, self._groups(pos))


def mine_negatives(candidates: torch.Tensor, id_text: torch.Tensor, count: int, eta: float) -> np.ndarray:
    """Indices of the ``count`` candidates farthest from the ID labels (NegMining), farthest first.

    Distance of candidate c: the eta-percentile of {-cos(c, t_k)}, i.e. minus the (1-eta)-quantile of
    its cosines (linear interpolation, as ``numpy.quantile``). Ties keep the corpus order.
    """
    n, k = len(candidates), len(id_text)
    if n == 0 or count == 0:
        return np.zeros(0, dtype=np.int64)
    level = 1.0 - eta
    position = level * (k - 1)
    lo = int(np.floor(position))
    hi = min(lo + 1, k - 1)
    frac = position - lo
    quantiles = []
    rows = max(1, (1 << 22) // max(k, 1))  # bound the (rows x K) block
    ids = torch.nn.functional.normalize(id_text.double(), dim=1)
    for start in range(0, n, rows):
        block = torch.nn.functional.normalize(candidates[start : start + rows].double(), dim=1)
        sims = torch.sort(block @ ids.T, dim=1).values
        quantiles.append(sims[:, lo] + frac * (sims[:, hi] - sims[:, lo]))
    closeness = torch.cat(quantiles)
    order = torch.sort(closeness, stable=True).indices
    return order[: min(count, n)].numpy().astype(np.int64)
