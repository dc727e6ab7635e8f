"""CSP and NegRefine against independent ports of their official code, on tiny hand-made embeddings.

- CSP: MengyuanChen21/NeurIPS2024-CSP ``mmcls/models/classifiers/multi_modal.py`` (pool, prompts,
  mining with the 0.95 rule) and ``mmcls/models/ood/clip_ood.py`` (grouped score);
- NegRefine: ah-ansari/NegRefine ``src/create_negs.py`` (mining with ``pencentile=1``),
  ``src/neg_filter.py`` (``_clean_words``; the LLM is replaced by WordNet, checked on known WordNet
  facts) and ``src/clip_ood.py`` (``_multi_matching_score``, ``detection_score``).

The ports below are written from reading those files (loops and torch/numpy, not oodscope's code). The
only departure they mirror on purpose is oodscope's documented one: a prompt ensemble is the mean of
normalized embeddings (the official code averages raw CLIP outputs).
"""

from __future__ import annotations

import hashlib
import random
import re

import numpy as np
import pytest
import torch

from oodscope.detectors import DetectorError, create, load
from oodscope.text.lexicon import Lexicon
from oodscope.text.prompts import TextEmbeddingCache

NOUN_T = ["a close-up photo of the nice {}.", "a photo with the nice {}.", "a good photo with the nice {}.",
          "a photo of the nice {}.", "{}", "the {}", "the good {}", "the nice {}"]
ADJ_T = ["{}", "a nice photo of {}", "a good photo of {}", "a close-up photo of {}"]
SUPER_T = ["{} environment", "{} space", "{} object", "{} scene", "{} place", "{} item", "{} area", "{} view",
           "{} thing", "{} pattern", "{} structure", "{} landscape", "{} vista", "{} creature"]
DIM = 32


def _noise(text: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(DIM)
    return v / np.linalg.norm(v)


class WordEncoder:
    """A prompt naming exactly one vocabulary word -> that word's unit vector + 0.1 * a text-seeded unit
    noise (so templates matter); any other text (e.g. "cat and stone") -> the text-seeded noise alone."""

    def __init__(self, vocab: dict[str, np.ndarray]) -> None:
        self.vocab = vocab
        self.seen: list[str] = []
        digest = hashlib.sha256(repr(sorted((k, tuple(v)) for k, v in vocab.items())).encode())
        self.id = "words-" + digest.hexdigest()[:8]

    def encode_texts(self, texts):
        self.seen.extend(texts)
        rows = []
        for t in texts:
            hits = {w for w in re.findall(r"[a-z0-9]+", t.lower()) if w in self.vocab}
            if len(hits) == 1:
                word = self.vocab[hits.pop()]
                v = word / np.linalg.norm(word) + 0.1 * _noise(t)
            else:
                v = _noise(t)
            rows.append(v / np.linalg.norm(v))
        return np.asarray(rows, dtype=np.float32)


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch):
    import oodscope.text.prompts as prompts

    monkeypatch.setattr(prompts, "_DEFAULT_CACHE", TextEmbeddingCache())


# 30 orthogonal ID classes; nouns and adjectives with positive coordinates (cosine > 0 with every class)
# and one noun, "twin", that is class c0 itself: its 0.95-quantile of cosines is ~0 (the farthest of all),
# its largest cosine ~1, so only the 0.95 rule keeps it out.
CLASSES = [f"c{i}" for i in range(30)]
_rng = np.random.default_rng(0)
VOCAB = {c: np.eye(DIM)[i] for i, c in enumerate(CLASSES)}
NOUNS = [f"n{i}" for i in range(40)] + ["twin", "c3"]  # c3: an ID name, never a negative
ADJS = [f"a{i}" for i in range(20)]
for w in NOUNS[:40] + ADJS:
    VOCAB[w] = np.abs(_rng.standard_normal(DIM)) + 0.2
VOCAB["twin"] = np.eye(DIM)[0]
LEXICON = Lexicon(tuple(NOUNS + ADJS), ("noun",) * len(NOUNS) + ("adj",) * len(ADJS))


# --------------------------------------------------------------------------- the ports
def _embed(enc, labels, templates):
    """``_embed_text_labels`` (mean over templates; here of the normalized embeddings), normalized."""
    e = torch.from_numpy(enc.encode_texts([t.format(w) for w in labels for t in templates])).double()
    e = e / e.norm(dim=-1, keepdim=True)
    e = e.view(len(labels), len(templates), -1).mean(dim=1)
    return e / e.norm(dim=-1, keepdim=True)


def _randperm(n: int) -> torch.Tensor:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torch.randperm(n)


def _grouping(pos, neg, ngroup):
    """``ScalableClassifier.grouping`` (random_permute=True, t = 1 on logits 100 * cos)."""
    drop = neg.shape[1] % ngroup
    if drop > 0:
        neg = neg[:, :-drop]
    negs = neg.T[_randperm(neg.shape[1])].T.reshape(pos.shape[0], ngroup, -1)
    scores = [torch.cat([pos, negs[:, i, :]], dim=-1).softmax(dim=-1)[:, : pos.shape[1]].sum(dim=-1)
              for i in range(ngroup)]
    return torch.stack(scores, dim=-1).mean(dim=-1)


def _official_pool_and_mining(enc, classes, nouns, adjs, *, seed=0, percentile=0.95, top=0.15, rule=0.95):
    """CLIPScalableClassifier.__init__ / create_initial_negative_labels: conjugated pool, prompts, the
    percentile with the 0.95 rule, ``int(n * top)`` of each part of speech, nouns first."""
    random.seed(seed)
    conj = [random.choice(SUPER_T).format(a) for a in adjs]
    nouns = [n for n in nouns if n not in classes]  # oodscope / NegRefine: ID names are not candidates
    pos_t = _embed(enc, classes, NOUN_T)
    neg_t = torch.cat([_embed(enc, nouns, NOUN_T), _embed(enc, conj, ADJ_T)])
    tmp = neg_t @ pos_t.T
    sim = torch.quantile(tmp, q=percentile, dim=-1)
    sim[tmp.max(dim=1)[0] > rule] = 1.0
    ind_noun, ind_adj = torch.argsort(sim[: len(nouns)], stable=True), torch.argsort(sim[len(nouns):], stable=True)
    kn, ka = int(len(nouns) * top), int(len(conj) * top)
    words = [nouns[i] for i in ind_noun[:kn]] + [conj[i] for i in ind_adj[:ka]]
    kept = torch.cat([neg_t[: len(nouns)][ind_noun[:kn]], neg_t[len(nouns):][ind_adj[:ka]]])
    return pos_t, kept, words, kn


def _images(n=16, seed=3):
    x = np.random.default_rng(seed).standard_normal((n, DIM)) + 0.3
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# =========================================================================================== CSP
def test_csp_matches_the_official_pool_mining_and_score() -> None:
    enc = WordEncoder(VOCAB)
    det = create("csp", classes=CLASSES, ngroups=3).fit(text_encoder=enc, lexicon=LEXICON)
    pos_t, neg_t, words, kn = _official_pool_and_mining(enc, CLASSES, NOUNS, ADJS)
    assert det.fit_info_["negative_words"] == words  # int(41 * .15) = 6 nouns, int(20 * .15) = 3 conjugated
    assert det.fit_info_["negative_pos"] == ["noun"] * kn + ["adj"] * (len(words) - kn)
    assert "twin" not in words and all(w.split()[1] in {t.split()[1] for t in SUPER_T} for w in words[kn:])
    x = torch.from_numpy(_images())
    official = _grouping(100.0 * x @ pos_t.T, 100.0 * x @ neg_t.T, 3)
    np.testing.assert_allclose(det.score(x.numpy()), -official.numpy(), rtol=0, atol=1e-6)
    # without the 0.95 rule "twin" (the ID class c0 itself) would be the farthest noun
    loose = create("csp", classes=CLASSES, max_id_similarity=1.0).fit(text_encoder=enc, lexicon=LEXICON)
    assert loose.fit_info_["negative_words"][0] == "twin"
    assert _official_pool_and_mining(enc, CLASSES, NOUNS, ADJS, rule=2.0)[2] == loose.fit_info_["negative_words"]


def test_csp_conjugation_is_pythons_seeded_choice() -> None:
    from oodscope.detectors.csp import conjugate

    lex = Lexicon(("rock", "red", "blue", "tree", "green"), ("noun", "adj", "adj", "noun", "adj"))
    for seed in (0, 5):
        random.seed(seed)
        expected = [random.choice(SUPER_T).format(a) for a in ("red", "blue", "green")]
        out = conjugate(lex, SUPER_T, seed)
        assert [w for w, p in zip(out.words, out.pos, strict=True) if p == "adj"] == expected
        assert [w for w, p in zip(out.words, out.pos, strict=True) if p == "noun"] == ["rock", "tree"]
    assert conjugate(lex, SUPER_T, 0) != conjugate(lex, SUPER_T, 5)


def test_csp_corpus_leaves_out_the_official_categories() -> None:
    from oodscope.text.lexicon import OFFICIAL_CORPUS, wordnet_lexicon

    enc = WordEncoder({"x": np.ones(DIM)})
    det = create("csp", classes=["circle"], corpus_options={"categories": ["noun.shape", "adj.ppl", "adj.pert"]})
    det.fit(text_encoder=enc)
    excluded = (*OFFICIAL_CORPUS["exclude_categories"], "noun.person", "noun.quantity", "noun.group", "adj.pert")
    corpus = wordnet_lexicon(categories=["noun.shape", "adj.ppl", "adj.pert"], exclude=["circle"], lemmas="heads",
                             exclude_categories=excluded)
    with_pert = wordnet_lexicon(categories=["noun.shape", "adj.ppl", "adj.pert"], exclude=["circle"], lemmas="heads")
    counts = det.fit_info_["num_candidates_by_pos"]
    assert counts == {"noun": corpus.pos.count("noun"), "adj": corpus.pos.count("adj")}
    assert with_pert.pos.count("adj") > counts["adj"] > 0  # adj.pert is left out
    assert len(det.fit_info_["negative_words"]) == int(counts["noun"] * 0.15) + int(counts["adj"] * 0.15)
    assert det.fit_info_["recipe"]["exclude_categories"] == ["noun.person", "noun.quantity", "noun.group",
                                                             "adj.pert"]


def test_csp_parameters_and_determinism(tmp_path) -> None:
    enc = WordEncoder(VOCAB)
    with pytest.raises(DetectorError, match="noun_template"):
        create("csp", classes=CLASSES, noun_template="a {}")
    with pytest.raises(DetectorError, match="adjective_templates"):
        create("csp", classes=CLASSES, adjective_templates=["no placeholder"])
    a = create("csp", classes=CLASSES, ngroups=4).fit(text_encoder=enc, lexicon=LEXICON)
    b = create("csp", classes=CLASSES, ngroups=4).fit(text_encoder=enc, lexicon=LEXICON)
    x = _images()
    np.testing.assert_array_equal(a.score(x), b.score(x))
    for key in a.state_:
        assert torch.equal(a.state_[key], b.state_[key])
    a.save(tmp_path / "csp")
    again = load(tmp_path / "csp")
    np.testing.assert_array_equal(again.score(x), a.score(x))
    other_seed = create("csp", classes=CLASSES, ngroups=4, seed=1).fit(text_encoder=enc, lexicon=LEXICON)
    assert other_seed.fit_info_["negative_words"][6:] != a.fit_info_["negative_words"][6:]  # other superclasses


# ===================================================================================== NegRefine
def _official_negrefine_score(enc, classes, neg_labels, neg_t, pos_t, x, ngroup, k_pos=5, k_neg=5):
    """``CLIPood.detection_score`` for each image: NegLabel's grouped score + 2 * the multi-matching score."""
    pos_sim, neg_sim = 100.0 * x @ pos_t.T, 100.0 * x @ neg_t.T
    base = _grouping(pos_sim, neg_sim, ngroup)
    out = []
    for i in range(len(x)):
        top_pos = [classes[j] for j in torch.topk(pos_sim[i], k_pos).indices]
        vals, ind = torch.topk(neg_sim[i], k_neg)
        texts, sims = [], []
        for p in top_pos:
            for j, n in enumerate(ind):
                texts.append(p + " and " + neg_labels[n])
                sims.append(vals[j])
        feats = _embed(enc, texts, NOUN_T)
        sim = 100.0 * x[i] @ feats.T
        ss = torch.exp(sim) / (torch.exp(sim) + torch.exp(torch.stack(sims)))
        out.append(base[i] + 2 * ss.max())
    return torch.stack(out)


@pytest.mark.parametrize("pair_texts", ["all", "lazy"])
def test_negrefine_matches_the_official_mining_and_score(pair_texts: str) -> None:
    enc = WordEncoder(VOCAB)
    classes = CLASSES[:8]
    det = create("negrefine", classes=classes, ngroups=2, refine=False, pair_texts=pair_texts)
    det.fit(text_encoder=enc, lexicon=LEXICON)
    # pencentile = 1: the largest cosine ranks the candidates
    pos_t, neg_t, words, _ = _official_pool_and_mining(enc, classes, NOUNS, ADJS, percentile=1.0)
    assert det.fit_info_["negative_words"] == words
    assert len(det.state_["pair_ids"]) == (8 * len(words) if pair_texts == "all" else 0)
    x = torch.from_numpy(_images(10))
    expected = _official_negrefine_score(enc, classes, words, neg_t, pos_t, x, 2)
    np.testing.assert_allclose(det.score(x.numpy()), -expected.numpy(), rtol=0, atol=1e-6)
    # CSP's prompt parameters pass through (one template: the pair texts use it too)
    one = create("negrefine", classes=classes, ngroups=2, refine=False, noun_templates=["the nice {}"],
                 templates=["the nice {}"]).fit(text_encoder=enc, lexicon=LEXICON)
    assert f"the nice c0 and {words[0]}" in enc.seen and one.get_params()["noun_templates"] == ["the nice {}"]
    # the multi-matching term matters here: weight 0 is NegLabel's grouped score alone
    plain = create("negrefine", classes=classes, ngroups=2, refine=False, multi_matching_weight=0.0)
    plain.fit(text_encoder=enc, lexicon=LEXICON)
    np.testing.assert_allclose(plain.score(x.numpy()), -_grouping(100 * x @ pos_t.T, 100 * x @ neg_t.T, 2).numpy(),
                               rtol=0, atol=1e-6)
    assert np.abs(plain.score(x.numpy()) - det.score(x.numpy())).max() > 1e-3


def test_negrefine_lazy_pairs_persist_and_need_the_encoder_for_new_images(tmp_path) -> None:
    enc = WordEncoder(VOCAB)
    classes = CLASSES[:6]
    full = create("negrefine", classes=classes, refine=False, pair_texts="all").fit(text_encoder=enc, lexicon=LEXICON)
    lazy = create("negrefine", classes=classes, refine=False, pair_texts="lazy").fit(text_encoder=enc, lexicon=LEXICON)
    seen, unseen = _images(1, seed=1), _images(8, seed=2)  # one image: 5 x 5 of the 6 x 9 pairs
    np.testing.assert_allclose(lazy.score(seen), full.score(seen), rtol=0, atol=1e-7)
    assert len(lazy.state_["pair_ids"]) == 25 and len(full.state_["pair_ids"]) == 6 * 9
    lazy.save(tmp_path / "lazy")
    again = load(tmp_path / "lazy")
    np.testing.assert_array_equal(again.score(seen), lazy.score(seen))  # no encoder needed for seen pairs
    with pytest.raises(DetectorError, match="attach_text_encoder"):
        again.score(unseen)
    again.attach_text_encoder(enc)
    np.testing.assert_allclose(again.score(unseen), full.score(unseen), rtol=0, atol=1e-7)
    # a saved "all" detector needs nothing
    full.save(tmp_path / "full")
    np.testing.assert_array_equal(load(tmp_path / "full").score(unseen), full.score(unseen))


def test_clean_label_is_the_official_clean_words() -> None:
    from oodscope.detectors.negrefine import clean_label

    def official(word):  # _clean_words for one word
        w = "".join(c for c in word if c.isalpha() or c in {"_", "-", " "})
        return w if len(w) > 2 else None

    for word in ["st. john's wort", "1530s", "a-ok environment", "x", "ab", "abc", "o'clock", "b-52"]:
        assert (clean_label(word) or None) == official(word)


def test_wordnet_filter_removes_synonyms_subcategories_and_proper_nouns() -> None:
    """Known WordNet 3.0 facts: "tabby" is below "cat" (tabby -> domestic cat -> cat), "true cat" is a
    synonym of "cat", "hatchback" is a car, "Paris" is written only with a capital, "china" also as the
    porcelain; "stone" and a conjugated adjective are kept."""
    from oodscope.detectors.negrefine import refine_negatives

    words = ("tabby", "true cat", "hatchback", "paris", "china", "stone", "1530s", "stone", "feline creature",
             "paris scene")
    pos = ("noun",) * 8 + ("adj", "adj")
    kept, removed = refine_negatives(Lexicon(words, pos), ["cat", "sports car/car"])
    assert kept.words == ("china", "stone", "feline creature", "paris scene")
    assert kept.pos == ("noun", "noun", "adj", "adj")
    assert removed == {"unclean": ["1530s"], "proper_noun": ["paris"],
                       "subcategory_or_synonym": ["tabby", "true cat", "hatchback"]}


def test_negrefine_fit_applies_the_filter() -> None:
    vocab = {"cat": np.eye(DIM)[0], "dog": np.eye(DIM)[1]}
    rng = np.random.default_rng(5)
    nouns = ["tabby", "paris", "stone", "rock", "lamp", "chair", "cloud", "river", "hill", "road"]
    for w in nouns:
        vocab[w] = rng.standard_normal(DIM)
    enc = WordEncoder(vocab)
    lex = Lexicon(tuple(nouns), ("noun",) * len(nouns))
    det = create("negrefine", classes=["cat", "dog"], num_negatives=1.0, ngroups=2).fit(text_encoder=enc, lexicon=lex)
    raw = create("negrefine", classes=["cat", "dog"], num_negatives=1.0, ngroups=2, refine=False)
    raw.fit(text_encoder=enc, lexicon=lex)
    assert det.fit_info_["num_initial_negatives"] == len(raw.fit_info_["negative_words"]) == 10
    kept = [w for w in raw.fit_info_["negative_words"] if w not in ("tabby", "paris")]
    assert det.fit_info_["negative_words"] == kept
    assert det.state_["negative_text"].shape == (8, DIM) and len(det.state_["pair_ids"]) == 2 * 8


def test_packaged_noun_hierarchy_is_the_system_wordnet() -> None:
    from pathlib import Path

    from oodscope.text.wordnet_graph import format_noun_hierarchy, load_noun_hierarchy, read_noun_hierarchy

    if not Path("/usr/share/wordnet/data.noun").is_file():
        pytest.skip("Debian wordnet-base is not installed")
    packaged = load_noun_hierarchy("packaged")
    assert format_noun_hierarchy(packaged) == format_noun_hierarchy(read_noun_hierarchy())
    assert len(packaged) == 82115
