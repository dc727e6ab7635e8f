"""oodscope.text: prompts, prompt ensembling, the text-embedding cache and the WordNet lexicon."""

from __future__ import annotations

import hashlib
import json
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest

from oodscope.text import lexicon as lx
from oodscope.text.prompts import (
    DEFAULT_TEMPLATES,
    SIMPLE_TEMPLATES,
    TextEmbeddingCache,
    class_prompts,
    class_text_embeddings,
    encoder_key,
    ensemble,
    resolve_templates,
)


class HashEncoder:
    """Deterministic text encoder: a unit vector seeded by the SHA-256 of the text. Counts its work."""

    def __init__(self, dim: int = 8, ident: str | None = "hash-8", fingerprint: str | None = None) -> None:
        self.dim = dim
        if ident is not None:
            self.id = ident
        self._fingerprint = fingerprint
        self.calls = 0
        self.texts_seen: list[str] = []

    def weights_fingerprint(self) -> str:
        return self._fingerprint or "w0"

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        self.texts_seen.extend(texts)
        return np.stack([hash_vector(t, self.dim) for t in texts]).astype(np.float32)


def hash_vector(text: str, dim: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(dim)
    return v / np.linalg.norm(v)


# --------------------------------------------------------------------------- templates and prompts
def test_template_sets() -> None:
    assert resolve_templates(None) == DEFAULT_TEMPLATES == resolve_templates("ensemble")
    assert resolve_templates("simple") == SIMPLE_TEMPLATES == ("a photo of a {}.",)
    assert 10 <= len(DEFAULT_TEMPLATES) <= 20
    assert len(set(DEFAULT_TEMPLATES)) == len(DEFAULT_TEMPLATES)
    assert all(t.count("{}") == 1 for t in DEFAULT_TEMPLATES)
    assert resolve_templates("an {} here") == ("an {} here",)
    for bad in (["no slot"], ["two {} {}"], []):
        with pytest.raises(ValueError):
            resolve_templates(bad)


def test_class_prompts_custom_and_descriptions() -> None:
    prompts = class_prompts(
        ["cat", "dog"],
        templates=["a {}.", "the {}!"],
        custom={"dog": ["a good {} wagging its tail", "man's best friend"]},
        descriptions={"cat": ["a {} has whiskers", "it purrs"]},
    )
    assert prompts[0] == ["a cat.", "the cat!", "a cat has whiskers", "it purrs"]
    assert prompts[1] == ["a good dog wagging its tail", "man's best friend"]
    with pytest.raises(ValueError, match="unknown classes"):
        class_prompts(["cat"], custom={"cow": ["x"]})
    with pytest.raises(ValueError, match="unique"):
        class_prompts(["cat", "cat"])
    with pytest.raises(TypeError):
        class_prompts("cat")


def test_ensemble_is_normalized_mean() -> None:
    rows = np.array([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 1.0]])
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    expected = unit.mean(0) / np.linalg.norm(unit.mean(0))
    np.testing.assert_allclose(ensemble(rows), expected, rtol=1e-6)
    assert ensemble(rows).dtype == np.float32


def test_class_text_embeddings_matches_numpy_ensemble() -> None:
    enc = HashEncoder(dim=6)
    classes = ["cat", "sea lion"]
    templates = ["a photo of a {}.", "a drawing of the {}", "{} outdoors"]
    got = class_text_embeddings(enc, classes, templates, cache=TextEmbeddingCache())
    assert got.shape == (2, 6) and got.dtype == np.float32
    for i, name in enumerate(classes):
        vecs = np.stack([hash_vector(t.format(name), 6) for t in templates])
        mean = vecs.mean(0)
        np.testing.assert_allclose(got[i], mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)


# --------------------------------------------------------------------------- cache
def test_cache_hits_do_not_call_the_encoder_again() -> None:
    cache = TextEmbeddingCache()
    enc = HashEncoder()
    first = cache.encode(enc, ["a", "b", "a"])
    assert enc.calls == 1 and enc.texts_seen == ["a", "b"]  # duplicates encoded once
    second = cache.encode(enc, ["b", "a"])
    assert enc.calls == 1 and cache.encoded_count == 2
    np.testing.assert_array_equal(second, first[[1, 0]])
    cache.encode(enc, ["a", "c"])
    assert enc.calls == 2 and enc.texts_seen == ["a", "b", "c"]
    # class_text_embeddings goes through the same cache
    class_text_embeddings(enc, ["x"], ["{}"], cache=cache)
    class_text_embeddings(enc, ["x"], ["{}"], cache=cache)
    assert enc.calls == 3


def test_cache_separates_encoders_and_handles_encoders_without_id() -> None:
    cache = TextEmbeddingCache()
    a, b = HashEncoder(dim=4, ident="enc-a"), HashEncoder(dim=5, ident="enc-b")
    assert cache.encode(a, ["t"]).shape == (1, 4)
    assert cache.encode(b, ["t"]).shape == (1, 5)
    other_weights = HashEncoder(dim=4, ident="enc-a", fingerprint="w1")
    assert encoder_key(other_weights) != encoder_key(a)
    cache.encode(other_weights, ["t"])
    assert other_weights.calls == 1  # new weights: not served from enc-a's entries
    anon1, anon2 = HashEncoder(ident=None), HashEncoder(ident=None)
    assert encoder_key(anon1) is None
    cache.encode(anon1, ["t"])
    cache.encode(anon1, ["t"])
    cache.encode(anon2, ["t"])
    assert anon1.calls == 1 and anon2.calls == 1


def test_persist_default_cache_moves_the_process_cache_to_disk(tmp_path, monkeypatch) -> None:
    from oodscope.text import prompts

    monkeypatch.setattr(prompts, "_DEFAULT_CACHE", None)
    monkeypatch.setenv("OODSCOPE_TEXT_CACHE", str(tmp_path / "env"))
    assert prompts.default_text_cache_dir() == tmp_path / "env"
    enc = HashEncoder()
    in_memory = prompts.default_cache()
    assert in_memory.directory == tmp_path / "env"  # the env var alone already persists
    monkeypatch.delenv("OODSCOPE_TEXT_CACHE")
    monkeypatch.setattr(prompts, "_DEFAULT_CACHE", TextEmbeddingCache())
    prompts.encode_texts(enc, ["kept from memory"])
    persisted = prompts.persist_default_cache(tmp_path / "cli")
    assert prompts.default_cache() is persisted and persisted.directory == tmp_path / "cli"
    assert prompts.persist_default_cache(tmp_path / "cli") is persisted  # idempotent
    prompts.encode_texts(enc, ["new text"])  # encoding writes the store, old entries included
    assert enc.calls == 2
    fresh_process = TextEmbeddingCache(tmp_path / "cli")
    got = fresh_process.encode(enc, ["kept from memory", "new text"])
    assert enc.calls == 2 and fresh_process.encoded_count == 0
    np.testing.assert_allclose(got[0], hash_vector("kept from memory", 8), rtol=1e-6)


def test_cache_rejects_bad_encoder_output() -> None:
    class Bad:
        id = "bad"

        def encode_texts(self, texts):
            return np.zeros((len(texts) + 1, 3))

    with pytest.raises(ValueError, match="expected"):
        TextEmbeddingCache().encode(Bad(), ["a"])


def test_disk_cache_round_trip_and_atomic_files(tmp_path: Path) -> None:
    enc = HashEncoder(dim=5, ident="disk-enc")
    cache = TextEmbeddingCache(tmp_path)
    first = cache.encode(enc, ["alpha", "beta"])
    index = json.loads((tmp_path / "index.json").read_text())
    entry = index["encoders"][encoder_key(enc)]
    assert entry["texts"] == ["alpha", "beta"] and entry["dim"] == 5
    assert (tmp_path / entry["file"]).is_file()
    cache.encode(enc, ["gamma"])  # rewrite: the old embeddings file is removed, no temp files left
    files_now = sorted(p.name for p in tmp_path.iterdir())
    assert len([f for f in files_now if f.endswith(".safetensors")]) == 1
    assert not [f for f in files_now if f.endswith(".tmp")]

    fresh_encoder = HashEncoder(dim=5, ident="disk-enc")
    reopened = TextEmbeddingCache(tmp_path)
    again = reopened.encode(fresh_encoder, ["beta", "alpha", "gamma"])
    assert fresh_encoder.calls == 0
    np.testing.assert_array_equal(again[:2], first[[1, 0]])

    (tmp_path / "index.json").write_text("{not json")
    broken = TextEmbeddingCache(tmp_path)
    broken.encode(fresh_encoder, ["alpha"])  # unreadable store: re-encode, then rewrite it
    assert fresh_encoder.calls == 1
    assert json.loads((tmp_path / "index.json").read_text())["format"] == "oodscope-text-cache"


# --------------------------------------------------------------------------- lexicon
def _fake_wordnet(directory: Path) -> Path:
    header = "  1 This software and database is being provided to you, the LICENSEE\n"
    (directory / "data.noun").write_text(
        header
        + "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which exists\n"
        + "02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 000 | a member of the genus Canis\n"
        + "07705931 13 n 02 apple 0 Dog 1 000 | fruit\n"
        + "09999999 06 n 0a a 0 b 0 c 0 d 0 e 0 f 0 g 0 h 0 i 0 jj 0 000 | hex word count\n"
    )
    (directory / "data.adj").write_text(
        header
        + "00001740 00 a 02 able 0 capable(a) 0 000 | having the means\n"
        + "00002000 00 s 01 red(p) 0 000 | coloured\n"
        + "00003000 44 a 01 dog 0 000 | an adjective that is also a noun\n"
    )
    return directory


def test_read_wordnet_data_parses_lemmas(tmp_path: Path) -> None:
    data = lx.read_wordnet_data(_fake_wordnet(tmp_path))
    assert data["noun.Tops"] == ["entity"]
    assert data["noun.animal"] == ["canis familiaris", "dog", "domestic dog"]
    assert data["noun.food"] == ["apple", "dog"]
    assert data["noun.artifact"] == sorted(list("abcdefghi") + ["jj"])
    assert data["adj.all"] == ["able", "capable", "red"]
    assert data["adj.ppl"] == ["dog"]
    assert lx.parse_word_list(lx.format_word_list(data)) == data


def test_wordnet_lexicon_options(tmp_path: Path) -> None:
    src = _fake_wordnet(tmp_path)
    full = lx.wordnet_lexicon(source=src)
    # nouns first (sorted), then adjectives that are not also nouns; "dog" kept once, as a noun
    assert full.words[:3] == ("a", "apple", "b")
    assert full.words.count("dog") == 1 and full.pos[full.words.index("dog")] == "noun"
    assert full.words[-3:] == ("able", "capable", "red") and set(full.pos[-3:]) == {"adj"}
    assert "canis familiaris" not in lx.wordnet_lexicon(single_word=True, source=src).words
    assert all(len(w) >= 3 for w in lx.wordnet_lexicon(min_length=3, source=src).words)
    only_food = lx.wordnet_lexicon(pos=["noun"], categories=["noun.food"], source=src)
    assert only_food.words == ("apple", "dog")
    no_animals = lx.wordnet_lexicon(pos=["noun"], exclude_categories=["noun.animal"], source=src)
    assert "domestic dog" not in no_animals.words and "dog" in no_animals.words  # still a food
    exact = lx.wordnet_lexicon(exclude=["Dog"], source=src)
    assert "dog" not in exact.words and "domestic dog" in exact.words
    by_word = lx.wordnet_lexicon(exclude=["hot dog"], overlap="word", source=src)
    assert "domestic dog" not in by_word.words and "dog" not in by_word.words and "apple" in by_word.words
    with pytest.raises(ValueError, match="unknown WordNet categories"):
        lx.wordnet_lexicon(categories=["noun.nothing"], source=src)


def test_packaged_word_list_counts_and_licence() -> None:
    data = lx.load_wordnet("packaged")
    nouns = {w for c, ws in data.items() if c.startswith("noun.") for w in ws}
    adjs = {w for c, ws in data.items() if c.startswith("adj.") for w in ws}
    assert (len(nouns), len(adjs), len(nouns | adjs)) == (117798, 21479, 136139)
    full = lx.wordnet_lexicon()
    assert len(full) == 136139 and full.pos.count("noun") == 117798
    assert len(set(full.words)) == len(full.words)
    assert all(w == w.lower() and "_" not in w for w in full.words[:5000])
    licence = (files("oodscope") / "data" / "wordnet_LICENSE.txt").read_text()
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in licence


def test_head_words_are_the_first_lemma_of_each_synset(tmp_path: Path) -> None:
    src = _fake_wordnet(tmp_path)
    heads = lx.read_wordnet_data(src, lemmas="heads")
    assert heads["noun.animal"] == ["dog"] and heads["noun.food"] == ["apple"] and heads["noun.artifact"] == ["a"]
    assert heads["adj.all"] == ["able", "red"] and heads["adj.ppl"] == ["dog"]
    assert lx.parse_word_list(lx.format_word_list(heads, "heads")) == heads
    official = lx.wordnet_lexicon(source=src, **lx.OFFICIAL_CORPUS)  # no noun.animal / noun.food
    assert official == lx.Lexicon(("a", "entity", "able", "dog", "red"), ("noun", "noun", "adj", "adj", "adj"))
    with pytest.raises(ValueError, match="lemmas"):
        lx.read_wordnet_data(src, lemmas="first")


def test_packaged_head_word_list_counts() -> None:
    """The official NegLabel/AdaNeg corpus: counts stated in oodscope.text.lexicon (NegLabel's own
    files: 58,546 nouns and 13,091 adjectives, 11,454 of them not also nouns)."""
    data = lx.load_wordnet("packaged", lemmas="heads")
    nouns = {w for c, ws in data.items() if c.startswith("noun.") for w in ws}
    adjs = {w for c, ws in data.items() if c.startswith("adj.") for w in ws}
    assert (len(nouns), len(adjs)) == (67186, 14006)
    official = lx.wordnet_lexicon(**lx.OFFICIAL_CORPUS)
    n_noun = official.pos.count("noun")
    n_adj = len(official) - n_noun
    assert (n_noun, n_adj) == (58514, 12280)
    assert len(adjs - set(official.words[:n_noun])) == n_adj  # adjectives that are nouns are kept as nouns
    # the official 15 % of each part of speech: floor, as int(len * 0.15) in NegLabel's code
    assert (int(n_noun * 0.15), int(n_adj * 0.15)) == (8777, 1842)
    assert int(58546 * 0.15) + int(11454 * 0.15) == 10499  # NegLabel's released 10,499 negatives
    assert int(58546 * 0.15) + int(13091 * 0.15) == 10744  # ... which 15 % of 13,091 adjectives would not give


@pytest.mark.skipif(not (lx.SYSTEM_WORDNET / "data.noun").is_file(), reason="wordnet-base not installed")
def test_packaged_word_list_equals_system_wordnet() -> None:
    assert lx.load_wordnet("packaged") == lx.load_wordnet("system")
    assert lx.load_wordnet("packaged", lemmas="heads") == lx.load_wordnet("system", lemmas="heads")


@pytest.mark.skipif(not (lx.SYSTEM_WORDNET / "data.noun").is_file(), reason="wordnet-base not installed")
def test_build_script_reproduces_the_shipped_lists() -> None:
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "build_wordnet_lists.py"
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "58514 nouns, 12280 adjectives" in done.stdout


def test_word_file_round_trip(tmp_path: Path) -> None:
    lex = lx.Lexicon(("stone", "windy", "sea shell"), ("noun", "adj", "noun"))
    path = lx.write_word_file(tmp_path / "neg.txt", lex)
    assert path.read_text() == "stone\tnoun\nwindy\tadj\nsea shell\tnoun\n"
    assert lx.read_word_file(path) == lex
    (tmp_path / "plain.txt").write_text("# comment\nstone\n\nwindy\tadj\nstone\n")
    assert lx.read_word_file(tmp_path / "plain.txt") == lx.Lexicon(("stone", "windy"), ("noun", "adj"))
    (tmp_path / "bad.txt").write_text("stone\tverb\n")
    with pytest.raises(ValueError, match="part of speech"):
        lx.read_word_file(tmp_path / "bad.txt")
    assert lx.Lexicon.from_words(["a", " b", "a", ""]) == lx.Lexicon(("a", "b"), ("noun", "noun"))
