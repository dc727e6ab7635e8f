"""NegLabel — negative labels mined from a large corpus (zero-shot, vision-language).

Jiang, Liu, Fang, Chen, Liu, Zheng, Han, "Negative Label Guided OOD Detection with Pretrained
Vision-Language Models", ICLR 2024.

Mining (NegMining): for each candidate word c, the distance to the ID labels is the eta-percentile of
{-cos(c, t_k)}_k, i.e. minus the (1-eta)-quantile of its cosines to the ID label embeddings; the
candidates with the largest distance become the negative labels.
Score: ``S = sum_ID e^{cos/tau} / (sum_ID e^{cos/tau} + sum_neg e^{cos/tau})``, computed separately for
ng random groups of the negatives and averaged (grouping strategy); OOD score = ``-S``.
Defaults: eta = 0.05 (the code's 0.95 quantile of similarities), ng = 100, tau = 0.01 (the code
multiplies cosines by 100).

Two recipes (``recipe=``; every setting below can also be given explicitly, which wins):

``"official"`` (default) — XueJiang16/NegLabel, ``mmcls/models/classifiers/multi_modal.py`` with
``custom_config/clip.py`` (``prompt_idx_pos = prompt_idx_neg = 85``, ``neg_topk = 0.15``,
``pencentile = 0.95``, ``ngroup = 100``):

- prompts: ID classes and noun negatives ``"the nice {}"`` (``prompt_templates[85]`` of
  ``class_names.py``), adjectives ``"This is a {} photo"`` (no full stops in NegLabel's code; AdaNeg's
  code, OpenOOD-VLM, writes them with full stops: see :mod:`oodscope.detectors.adaneg`);
- corpus: WordNet head words without ``noun.animal`` / ``noun.food``
  (:data:`oodscope.text.lexicon.OFFICIAL_CORPUS`, the shipped ``wordnet_heads.txt``: 58,514 nouns and
  12,280 adjectives that are not also nouns; NegLabel's own files: 58,546 and 11,454 after the same
  de-duplication — see :mod:`oodscope.text.lexicon` for the exact difference);
- selection: the farthest 15 % of each part of speech separately, ``floor(0.15 n_noun)`` nouns then
  ``floor(0.15 n_adj)`` adjectives (``int(len * neg_topk)`` in the code). With NegLabel's files that is
  8,781 + 1,718 = 10,499 negatives (15 % of 13,091 adjectives would be 1,963: the 10,499 of the paper's
  released list counts only adjectives that are not also nouns); with oodscope's list 8,777 + 1,842 =
  10,619;
- grouping: the last ``M mod ng`` negatives are dropped (``neg[:, :-drop]``), the rest permuted by
  ``torch.randperm`` seeded with ``seed`` and cut into ``ng`` equal groups. (NegLabel draws that
  permutation on the GPU, ``torch.cuda.manual_seed(0)``; ours is CPU torch's, so the partition
  differs while its structure is the same.)

``"oodscope-v1"`` — oodscope's recipe before issue 15: prompts ``templates="simple"`` ("a photo of a
{}."), nouns "a photo of a {}.", adjectives "a {} photo."; corpus every WordNet lemma (136,139 words);
the ``num_negatives = 10,000`` farthest chosen jointly over both parts of speech (the paper's
algorithm); groups near-equal contiguous blocks of a numpy permutation seeded with ``seed``.

``num_negatives``: an int is a count (jointly, or with ``selection="per_pos"`` split between the parts
of speech in proportion to their sizes), a float in (0, 1] a fraction (of each part of speech with
``"per_pos"``). The ID class names are never candidates.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from oodscope.detectors._zeroshot import PromptDetector, grouped_id_mass, make_groups
from oodscope.detectors.base import DetectorError, register
from oodscope.text.lexicon import OFFICIAL_CORPUS, Lexicon, read_word_file, wordnet_lexicon, write_word_file
from oodscope.text.prompts import TextEmbeddingCache, class_text_embeddings, encode_texts

#: Settings a recipe gives (each also a parameter; ``None`` there means "the recipe's").
RECIPE_KEYS = ("templates", "noun_template", "adjective_template", "corpus", "num_negatives", "selection")

#: WordNet corpora by name -> options of :func:`oodscope.text.lexicon.wordnet_lexicon`.
CORPORA: dict[str, dict[str, Any]] = {"wordnet": {}, "wordnet-heads": dict(OFFICIAL_CORPUS)}

NEGLABEL_RECIPES: dict[str, dict[str, Any]] = {
    "official": {  # XueJiang16/NegLabel (see the module docstring)
        "templates": "the nice {}", "noun_template": "the nice {}", "adjective_template": "This is a {} photo",
        "corpus": "wordnet-heads", "num_negatives": 0.15, "selection": "per_pos",
        "quantile": "linear", "pos_order": ("noun", "adj"), "grouping": "drop",
    },
    "oodscope-v1": {
        "templates": "simple", "noun_template": "a photo of a {}.", "adjective_template": "a {} photo.",
        "corpus": "wordnet", "num_negatives": 10000, "selection": "joint",
        "quantile": "linear", "pos_order": ("noun", "adj"), "grouping": "balanced",
    },
}


@register
class NegLabel(PromptDetector):
    name = "neglabel"
    fit_options = ("lexicon",)  # a Lexicon to mine negatives from instead of the corpus
    score_batch_size = 1024  # (rows x 10k negatives) intermediates
    default_templates: ClassVar[str | None] = None  # None: the recipe's ID prompt
    recipes: ClassVar[dict[str, dict[str, Any]]] = NEGLABEL_RECIPES

    def __init__(
        self,
        classes: Sequence[str],
        recipe: str = "official",
        num_negatives: int | float | None = None,
        selection: str | None = None,
        eta: float = 0.05,
        ngroups: int = 100,
        temperature: float = 0.01,
        seed: int = 0,
        noun_template: str | None = None,
        adjective_template: str | None = None,
        corpus: str | None = None,
        corpus_options: Mapping[str, Any] | None = None,
        negatives: str | Sequence[str] | None = None,
        **prompt_options: Any,
    ) -> None:
        super().__init__()
        self._set_text_params(classes, **prompt_options)
        if recipe not in self.recipes:
            raise DetectorError(f"{self.name}: recipe must be one of {sorted(self.recipes)}, got {recipe!r}")
        self.recipe = recipe
        self.num_negatives = num_negatives
        self.selection = selection
        count, selection = self.setting("num_negatives"), self.setting("selection")
        if isinstance(count, bool) or not isinstance(count, (int, float)):
            raise DetectorError(f"{self.name}: num_negatives must be a count (int) or a fraction (float)")
        if isinstance(count, int) and count < 0:
            raise DetectorError(f"{self.name}: num_negatives must be >= 0")
        if isinstance(count, float) and not 0.0 <= count <= 1.0:
            raise DetectorError(f"{self.name}: a fractional num_negatives must be in [0, 1], got {count}")
        if selection not in ("joint", "per_pos"):
            raise DetectorError(f"{self.name}: selection must be 'joint' or 'per_pos', got {selection!r}")
        if not 0.0 <= eta <= 1.0:
            raise DetectorError(f"{self.name}: eta must be in [0, 1]")
        if ngroups < 1:
            raise DetectorError(f"{self.name}: ngroups must be >= 1")
        if not temperature > 0:
            raise DetectorError(f"{self.name}: temperature must be > 0")
        self.noun_template = noun_template
        self.adjective_template = adjective_template
        for key in ("noun_template", "adjective_template"):
            template = self.setting(key)
            if not isinstance(template, str) or template.count("{}") != 1:
                raise DetectorError(f"{self.name}: template {template!r} must contain '{{}}' exactly once")
        self.eta = eta
        self.ngroups = ngroups
        self.temperature = temperature
        self.seed = seed
        self.corpus = corpus
        self.corpus_options = None if corpus_options is None else dict(corpus_options)
        self.negatives = negatives if negatives is None or isinstance(negatives, str) else list(negatives)

    def setting(self, key: str) -> Any:
        """A recipe setting in use: the parameter when given, else the recipe's value."""
        value = getattr(self, key, None) if key in RECIPE_KEYS else None
        return self.recipes[self.recipe][key] if value is None else value

    # ----------------------------------------------------------------- fit: mining
    def _encode_classes(self, encoder: Any, cache: TextEmbeddingCache | None) -> torch.Tensor:
        emb = class_text_embeddings(
            encoder, self.classes, self.setting("templates"), self.custom_prompts, self.descriptions, cache=cache
        )
        return torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32))

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
            order = select_negatives(
                cand_text, id_text, candidates.pos, self.setting("num_negatives"), self.eta,
                selection=self.setting("selection"), quantile=self.setting("quantile"),
                pos_order=self.setting("pos_order"),
            )
            chosen = Lexicon(
                tuple(candidates.words[i] for i in order), tuple(candidates.pos[i] for i in order)
            )
            neg_text = cand_text[torch.as_tensor(order, dtype=torch.long)]
            self.fit_info_["num_candidates"] = len(candidates)
            self.fit_info_["num_candidates_by_pos"] = {p: candidates.pos.count(p) for p in ("noun", "adj")}
        self.state_["negative_text"] = neg_text.contiguous()
        self.state_["negative_group"] = torch.from_numpy(
            negative_groups(len(chosen), self.ngroups, self.seed, self.setting("grouping"))
        )
        self.fit_info_["negative_words"] = list(chosen.words)
        self.fit_info_["negative_pos"] = list(chosen.pos)
        self.fit_info_["recipe"] = {k: self.setting(k) for k in (*RECIPE_KEYS, "quantile", "pos_order", "grouping")}
        self.fit_info_["recipe"]["pos_order"] = list(self.fit_info_["recipe"]["pos_order"])

    def _candidates(self, lexicon: Lexicon | None) -> Lexicon:
        excluded = {c.strip().lower() for c in self.classes}
        corpus = self.setting("corpus")
        if lexicon is None:
            options = dict(self.corpus_options or {})
            if corpus in CORPORA:
                options = CORPORA[corpus] | options
                options["exclude"] = list(options.get("exclude", [])) + list(self.classes)
                lexicon = wordnet_lexicon(**options)
            elif os.path.isfile(corpus):
                if options:
                    raise DetectorError(f"{self.name}: corpus_options only apply to the WordNet corpora")
                lexicon = read_word_file(corpus)
            else:
                raise DetectorError(
                    f"{self.name}: corpus must be {' or '.join(map(repr, CORPORA))} or a word-list file, got {corpus!r}"
                )
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
        noun, adj = self.setting("noun_template"), self.setting("adjective_template")
        texts = [
            (noun if pos == "noun" else adj).format(word) for word, pos in zip(lexicon.words, lexicon.pos, strict=True)
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


def negative_groups(count: int, ngroups: int, seed: int, grouping: str = "balanced") -> np.ndarray:
    """The group of each negative (``-1``: left out of the score).

    ``"balanced"``: :func:`~oodscope.detectors._zeroshot.make_groups` (every negative used, sizes
    differing by at most one). ``"drop"`` (the official code): the last ``count mod ngroups`` negatives
    are dropped, the others permuted by ``torch.randperm`` (CPU generator seeded with ``seed``) and cut
    into ``ngroups`` equal groups in that order. With fewer negatives than groups, each is its own group.
    """
    if grouping == "balanced":
        return make_groups(count, ngroups, seed)
    if grouping != "drop":
        raise DetectorError(f"grouping must be 'balanced' or 'drop', got {grouping!r}")
    if ngroups < 1:
        raise DetectorError("ngroups must be >= 1")
    groups = min(ngroups, count)
    out = np.full(count, -1, dtype=np.int64)
    if count == 0:
        return out
    kept = count - count % groups
    perm = torch.randperm(kept, generator=torch.Generator().manual_seed(int(seed))).numpy()
    out[perm] = np.arange(kept) // (kept // groups)
    return out


def select_negatives(
    candidates: torch.Tensor, id_text: torch.Tensor, pos: Sequence[str], count: int | float, eta: float, *,
    selection: str = "joint", quantile: str = "linear", pos_order: Sequence[str] = ("noun", "adj"),
) -> np.ndarray:
    """Indices of the chosen negatives (NegMining), in the order they are used.

    ``selection="joint"``: the ``count`` farthest candidates (a float: that fraction of all, floored),
    farthest first. ``"per_pos"``: each part of speech on its own, in ``pos_order``, farthest first
    within it; a float ``count`` keeps ``floor(count * n_pos)`` of each (NegLabel's ``neg_topk``), an
    int is split in proportion to the parts' sizes, ``int(count * n_adj / n)`` adjectives and the rest
    nouns (AdaNeg's code). ``quantile``: see :func:`mine_negatives`.
    """
    n = len(candidates)
    if selection == "joint":
        take = int(count * n) if isinstance(count, float) else int(count)
        return mine_negatives(candidates, id_text, take, eta, quantile=quantile)
    if selection != "per_pos":
        raise DetectorError(f"selection must be 'joint' or 'per_pos', got {selection!r}")
    members, takes = per_pos_takes(pos, count)
    out = []
    for p in pos_order:
        idx = members[p]
        if len(idx) and takes[p]:
            chosen = mine_negatives(candidates[torch.as_tensor(idx)], id_text, takes[p], eta, quantile=quantile)
            out.append(idx[chosen])
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, dtype=np.int64)


def per_pos_takes(pos: Sequence[str], count: float | int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Each part of speech's candidate indices and how many of them to keep: ``floor(count * n_pos)`` of
    each for a float ``count``; an int ``count`` split in proportion to the parts' sizes."""
    n = len(pos)
    members = {p: np.flatnonzero(np.asarray(pos, dtype=object) == p) for p in ("noun", "adj")}
    if isinstance(count, float):
        return members, {p: int(len(idx) * count) for p, idx in members.items()}
    total = min(int(count), n)
    n_adj = int(total * (len(members["adj"]) / n)) if n else 0
    return members, {"adj": n_adj, "noun": total - n_adj}


def mine_negatives(
    candidates: torch.Tensor, id_text: torch.Tensor, count: int, eta: float, *, quantile: str = "linear"
) -> np.ndarray:
    """Indices of the ``count`` candidates farthest from the ID labels (NegMining), farthest first.

    Distance of candidate c: the eta-percentile of {-cos(c, t_k)}, i.e. minus the (1-eta)-quantile of
    its cosines — ``quantile="linear"``: linear interpolation, as ``numpy.quantile`` and NegLabel's
    ``torch.quantile``; ``"index"``: the sorted cosine at index ``int(K (1-eta))``, as AdaNeg's code
    (``cos_sim_indice_selected = int(cate_num * 0.95)``). Ties keep the corpus order.
    """
    n, k = len(candidates), len(id_text)
    if n == 0 or count == 0:
        return np.zeros(0, dtype=np.int64)
    level = 1.0 - eta
    if quantile == "linear":
        position = level * (k - 1)
        lo = int(np.floor(position))
        frac = position - lo
    elif quantile == "index":
        lo, frac = min(int(k * level), k - 1), 0.0
    else:
        raise DetectorError(f"quantile must be 'linear' or 'index', got {quantile!r}")
    hi = min(lo + 1, k - 1)
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
