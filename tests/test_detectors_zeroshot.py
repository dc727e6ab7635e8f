"""Zero-shot vision-language detectors (MCM, GL-MCM, NegLabel, EOE, AdaNeg, CLIPN).

Each score is checked against an independent NumPy computation of the paper's formula on tiny
hand-made embeddings, plus properties (sign, invariances, determinism, persistence).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from oodscope.backbones.base import Features
from oodscope.detectors import DetectorError, create, load
from oodscope.detectors._zeroshot import make_groups
from oodscope.detectors.neglabel import mine_negatives
from oodscope.text.lexicon import Lexicon
from oodscope.text.prompts import TextEmbeddingCache


# --------------------------------------------------------------------------- tiny encoders
def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


class VocabEncoder:
    """Fixed vocabulary: a prompt's embedding is the vector of the one vocabulary word it contains."""

    def __init__(self, vocab: dict[str, np.ndarray], ident: str = "vocab") -> None:
        self.vocab = {w: unit(v) for w, v in vocab.items()}
        content = repr(sorted((w, tuple(v)) for w, v in self.vocab.items())).encode()
        self.id = f"{ident}-{hashlib.sha256(content).hexdigest()[:8]}"  # same vocabulary, same cache key
        self.calls = 0

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        out = []
        for text in texts:
            hits = [w for w in re.findall(r"[a-z0-9]+", text.lower()) if w in self.vocab]
            if len(set(hits)) != 1:
                raise KeyError(f"{text!r} names {hits}, not exactly one vocabulary word")
            out.append(self.vocab[hits[0]])
        return np.asarray(out, dtype=np.float32)


class HashEncoder:
    """Deterministic random unit vector per text (seeded by its SHA-256)."""

    def __init__(self, dim: int = 8) -> None:
        self.dim = dim
        self.id = f"hash-{dim}"

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        rows = []
        for t in texts:
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little")
            rows.append(unit(np.random.default_rng(seed).standard_normal(self.dim)))
        return np.asarray(rows, dtype=np.float32)


E = np.eye(4)
VOCAB = {
    "cat": E[0], "dog": E[1], "bird": E[0] + E[1] + E[2],
    "stone": E[3], "rock": E[3] + 0.1 * E[0], "kitten": E[0] + 0.1 * E[3], "puppy": E[1] + 0.2 * E[3],
    "windy": -E[0], "car": E[2], "tree": E[2] + E[3],
}
CLASSES = ["cat", "dog", "bird"]
X = np.array(
    [[1.0, 0.1, 0.0, 0.0], [0.2, 0.9, 0.1, 0.0], [0.3, 0.3, 0.3, 0.1], [0.0, 0.0, 0.2, 1.0], [-0.5, 0.1, 0.9, 0.4]]
)


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch):
    # Isolate the process-wide text cache per test (and keep it off disk).
    import oodscope.text.prompts as prompts

    monkeypatch.setattr(prompts, "_DEFAULT_CACHE", TextEmbeddingCache())


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def cos(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    return unit(x) @ unit(t).T


T_ID = unit(np.stack([VOCAB[c] for c in CLASSES]))


# --------------------------------------------------------------------------- MCM
@pytest.mark.parametrize("temperature", [1.0, 0.2])
def test_mcm_is_negated_max_softmax_of_scaled_cosines(temperature: float) -> None:
    det = create("mcm", classes=CLASSES, temperature=temperature).fit(text_encoder=VocabEncoder(VOCAB))
    expected = -softmax(cos(X, T_ID) / temperature).max(axis=1)
    got = det.score(X)
    assert got.dtype == np.float64 and got.shape == (len(X),)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert np.all(got < 0) and np.all(got >= -1)


def test_mcm_properties() -> None:
    det = create("mcm", classes=CLASSES, temperature=0.1).fit(text_encoder=VocabEncoder(VOCAB))
    base = det.score(X)
    np.testing.assert_allclose(det.score(3.7 * X), base, rtol=1e-6)  # norm of the embedding is irrelevant
    perm = np.array([3, 0, 4, 2, 1])
    np.testing.assert_allclose(det.score(X[perm]), base[perm], rtol=1e-6)
    # an image on a class text is less OOD than one orthogonal to all classes
    near, far = det.score(np.array([E[0], E[3]]))
    assert near < far
    with pytest.raises(DetectorError, match="dimension"):
        det.score(np.ones((2, 5)))
    feats = Features(embedding=X.astype(np.float32), logit_scale=100.0)
    np.testing.assert_allclose(det.score(feats), base, rtol=1e-5)


def test_zero_shot_fit_contract() -> None:
    det = create("mcm", classes=CLASSES)
    with pytest.raises(DetectorError, match="fit"):
        det.score(X)
    with pytest.raises(DetectorError, match="text_encoder"):
        det.fit(X)
    det.fit(None, text_encoder=VocabEncoder(VOCAB))
    assert det.fit_info_["text_dim"] == 4
    with pytest.raises(DetectorError, match="dimension"):
        create("mcm", classes=CLASSES).fit(np.ones((2, 7)), text_encoder=VocabEncoder(VOCAB))
    with pytest.raises(DetectorError):
        create("mcm", classes="cat")
    with pytest.raises(DetectorError, match="unique"):
        create("mcm", classes=["cat", "cat"])
    assert det.fit_needs().text_encoder and det.fit_needs().classes and not det.fit_needs().features


def test_prompt_options_reach_the_detector() -> None:
    enc = HashEncoder(dim=6)
    det = create(
        "mcm", classes=["cat", "dog"], templates=["a {} photo", "art of {}"], custom_prompts={"dog": ["woof {}"]}
    ).fit(text_encoder=enc)
    vec = {t: enc.encode_texts([t])[0].astype(np.float64) for t in ["a cat photo", "art of cat", "woof dog"]}
    cat = unit(unit(vec["a cat photo"]) + unit(vec["art of cat"]))
    np.testing.assert_allclose(det.state_["class_text"].numpy(), np.stack([cat, vec["woof dog"]]), atol=1e-6)


# --------------------------------------------------------------------------- GL-MCM
def _patches(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((len(X), 3, 4)) * rng.uniform(0.5, 4.0, (len(X), 3, 1))  # unnormalized


@pytest.mark.parametrize("local_weight,tl", [(1.0, 1.0), (0.5, 0.1)])
def test_glmcm_matches_numpy(local_weight: float, tl: float) -> None:
    det = create("glmcm", classes=CLASSES, local_weight=local_weight, temperature=0.5, local_temperature=tl)
    det.fit(text_encoder=VocabEncoder(VOCAB))
    patches = _patches()
    global_part = softmax(cos(X, T_ID) / 0.5).max(axis=1)
    local = softmax(np.einsum("npd,kd->npk", unit(patches), T_ID) / tl)
    expected = -(global_part + local_weight * local.reshape(len(X), -1).max(axis=1))
    np.testing.assert_allclose(det.score({"embedding": X, "patches": patches}), expected, rtol=1e-6)


def test_glmcm_with_zero_local_weight_is_mcm() -> None:
    enc = VocabEncoder(VOCAB)
    gl = create("glmcm", classes=CLASSES, local_weight=0.0, temperature=0.3).fit(text_encoder=enc)
    mcm = create("mcm", classes=CLASSES, temperature=0.3).fit(text_encoder=enc)
    feats = Features(embedding=X.astype(np.float32), patches=_patches(1).astype(np.float32))
    np.testing.assert_allclose(gl.score(feats), mcm.score(feats), rtol=1e-6)
    with pytest.raises(DetectorError, match="patches"):
        gl.score(Features(embedding=X.astype(np.float32)))


# --------------------------------------------------------------------------- NegLabel
def neglabel_reference(x, t_id, t_neg, groups, tau):
    pos = np.exp(cos(x, t_id) / tau).sum(axis=1)
    per_group = []
    for g in np.unique(groups[groups >= 0]):  # -1: dropped (the official recipe drops M mod ng)
        neg = np.exp(cos(x, t_neg[groups == g]) / tau).sum(axis=1)
        per_group.append(pos / (pos + neg))
    return -np.mean(per_group, axis=0)


def test_neglabel_without_negatives_is_constant() -> None:
    det = create("neglabel", classes=CLASSES, negatives=[]).fit(text_encoder=VocabEncoder(VOCAB))
    np.testing.assert_array_equal(det.score(X), -np.ones(len(X)))
    det0 = create("neglabel", classes=CLASSES, num_negatives=0).fit(
        text_encoder=VocabEncoder(VOCAB), lexicon=Lexicon.from_words(["stone", "rock"])
    )
    np.testing.assert_array_equal(det0.score(X), -np.ones(len(X)))


@pytest.mark.parametrize("ngroups", [1, 2, 3])
def test_neglabel_matches_numpy_formula(ngroups: int) -> None:
    negs = ["stone", "rock", "windy\tadj", "car", "tree"]
    det = create("neglabel", classes=CLASSES, negatives=negs, ngroups=ngroups, temperature=0.5, seed=3)
    det.fit(text_encoder=VocabEncoder(VOCAB))
    t_neg = unit(np.stack([VOCAB[w.split("\t")[0]] for w in negs]))
    groups = det.state_["negative_group"].numpy()
    assert sorted(np.unique(groups[groups >= 0])) == list(range(ngroups))
    assert (groups < 0).sum() == len(negs) % ngroups  # the official recipe drops M mod ng negatives
    np.testing.assert_allclose(det.score(X), neglabel_reference(X, T_ID, t_neg, groups, 0.5), rtol=1e-6)
    assert det.fit_info_["negative_pos"] == ["noun", "noun", "adj", "noun", "noun"]
    # the no-grouping score by hand for one image
    if ngroups == 1:
        x = unit(X[0])
        p = np.exp(T_ID @ x / 0.5).sum()
        q = np.exp(t_neg @ x / 0.5).sum()
        assert det.score(X[:1])[0] == pytest.approx(-p / (p + q), rel=1e-6)


def test_neglabel_is_stable_at_low_temperature() -> None:
    from scipy.special import expit, logsumexp

    negs = ["stone", "windy\tadj", "car", "tree"]
    det = create("neglabel", classes=CLASSES, negatives=negs, ngroups=2, temperature=0.001)
    det.fit(text_encoder=VocabEncoder(VOCAB))
    got = det.score(X)
    assert np.all(np.isfinite(got))
    t_neg = unit(np.stack([VOCAB[w.split("\t")[0]] for w in negs]))
    groups = det.state_["negative_group"].numpy()
    log_p = logsumexp(cos(X, T_ID) / 0.001, axis=1)
    ref = np.mean(
        [expit(log_p - logsumexp(cos(X, t_neg[groups == g]) / 0.001, axis=1)) for g in range(2)], axis=0
    )
    np.testing.assert_allclose(got, -ref, rtol=1e-5, atol=1e-12)


def test_make_groups_partition_and_seeding() -> None:
    g = make_groups(10, 3, seed=0)
    assert sorted(np.bincount(g)) == [3, 3, 4]
    np.testing.assert_array_equal(g, make_groups(10, 3, seed=0))
    assert not np.array_equal(g, make_groups(10, 3, seed=1))
    assert set(make_groups(2, 5, seed=0)) == {0, 1}  # never more groups than negatives
    assert len(make_groups(0, 5, seed=0)) == 0


def test_neglabel_grouping_deterministic_under_seed() -> None:
    enc = HashEncoder(dim=8)
    words = [f"w{i}" for i in range(40)]
    x = np.random.default_rng(0).standard_normal((6, 8))

    def scores(seed: int) -> np.ndarray:
        det = create("neglabel", classes=["a", "b"], negatives=words, ngroups=4, temperature=0.05, seed=seed)
        return det.fit(text_encoder=enc).score(x)

    np.testing.assert_array_equal(scores(0), scores(0))
    assert not np.allclose(scores(0), scores(1))


def test_negative_mining_selects_farthest_words() -> None:
    enc = VocabEncoder(VOCAB)
    lexicon = Lexicon(
        ("stone", "rock", "kitten", "puppy", "windy", "cat"), ("noun", "noun", "noun", "noun", "adj", "noun")
    )
    det = create("neglabel", classes=CLASSES, recipe="oodscope-v1", num_negatives=2, ngroups=1)
    det.fit(text_encoder=enc, lexicon=lexicon)
    # joint selection (recipe oodscope-v1)
    # 95th percentile of cosines to (cat, dog, bird): windy -0.058, stone 0, rock 0.095, puppy, kitten high
    assert det.fit_info_["negative_words"] == ["windy", "stone"]
    assert det.fit_info_["num_candidates"] == 5  # the ID name "cat" is never a candidate
    np.testing.assert_allclose(det.state_["negative_text"].numpy(), unit(np.stack([-E[0], E[3]])), atol=1e-6)

    # against numpy's quantile on random candidates
    rng = np.random.default_rng(5)
    cand, ids = unit(rng.standard_normal((50, 6))), unit(rng.standard_normal((7, 6)))
    closeness = np.quantile(cand @ ids.T, 0.9, axis=1)
    expected = np.argsort(closeness, kind="stable")[:12]
    got = mine_negatives(torch.from_numpy(cand).float(), torch.from_numpy(ids).float(), 12, eta=0.1)
    np.testing.assert_array_equal(got, expected)


def test_neglabel_export_import_and_wordnet_corpus(tmp_path: Path) -> None:
    enc = HashEncoder(dim=8)
    options = {"pos": ["noun"], "categories": ["noun.shape"], "single_word": True}
    det = create("neglabel", classes=["circle", "cat"], num_negatives=30, ngroups=3, corpus_options=options)
    det.fit(text_encoder=enc)
    words = det.fit_info_["negative_words"]
    assert len(words) == 30 and "circle" not in words and len(set(words)) == 30
    x = np.random.default_rng(2).standard_normal((4, 8))
    path = det.export_negatives(tmp_path / "negatives.txt")
    assert path.read_text().splitlines()[0] == f"{words[0]}\tnoun"
    again = create("neglabel", classes=["circle", "cat"], ngroups=3, negatives=str(path)).fit(text_encoder=enc)
    np.testing.assert_array_equal(again.score(x), det.score(x))


# --------------------------------------------------------------------------- EOE
def test_eoe_matches_numpy() -> None:
    det = create("eoe", classes=CLASSES, outlier_classes=["car", "tree"], temperature=0.5)
    det.fit(text_encoder=VocabEncoder(VOCAB))
    p = softmax(np.concatenate([cos(X, T_ID), cos(X, unit(np.stack([VOCAB["car"], VOCAB["tree"]])))], 1) / 0.5)
    expected = -(p[:, :3].max(axis=1) - 0.25 * p[:, 3:].max(axis=1))
    np.testing.assert_allclose(det.score(X), expected, rtol=1e-6)


def test_eoe_with_beta_zero_is_mcm_times_id_mass() -> None:
    # beta = 0: -max_{i in ID} p_joint_i, and p_joint_i = p_ID_i * sum_{ID} p_joint, so the score is
    # MCM's max probability (softmax over ID labels only) times the ID mass of the joint softmax.
    enc = VocabEncoder(VOCAB)
    eoe = create("eoe", classes=CLASSES, outlier_classes=["car", "tree"], beta=0.0, temperature=0.5).fit(
        text_encoder=enc
    )
    mcm = create("mcm", classes=CLASSES, temperature=0.5).fit(text_encoder=enc)
    joint = softmax(np.concatenate([cos(X, T_ID), cos(X, unit(np.stack([VOCAB["car"], VOCAB["tree"]])))], 1) / 0.5)
    np.testing.assert_allclose(eoe.score(X), mcm.score(X) * joint[:, :3].sum(axis=1), rtol=1e-6)
    # more outlier penalty -> more OOD
    heavy = create("eoe", classes=CLASSES, outlier_classes=["car", "tree"], beta=1.0, temperature=0.5)
    assert np.all(heavy.fit(text_encoder=enc).score(X) > eoe.score(X))


def test_eoe_outlier_name_filtering() -> None:
    det = create("eoe", classes=["sea lion", "cat"], outlier_classes=["Cat", "lion", "car", "car"])
    assert det.used_outliers() == ["lion", "car"]
    word = create("eoe", classes=["sea lion"], outlier_classes=["lion", "car"], exclude_overlapping=True)
    assert word.used_outliers() == ["car"]
    with pytest.raises(DetectorError, match="no outlier"):
        create("eoe", classes=["cat"], outlier_classes=["cat"])


# --------------------------------------------------------------------------- AdaNeg
def _entropy(z: np.ndarray) -> float:
    p = softmax(z)
    return float(-(p * np.log(p)).sum())


def _grouped_mass(pos, neg, groups):
    from scipy.special import expit, logsumexp

    if neg.shape[1] == 0:
        return np.ones(len(pos))
    log_p = logsumexp(pos, axis=1)
    used = np.unique(groups[groups >= 0])
    return np.mean([expit(log_p - logsumexp(neg[:, groups == g], axis=1)) for g in used], axis=0)


def adaneg_reference(batches, t_id, t_neg, groups, *, tau, size, gamma, gap, lam, sample_adaptive, beta):
    """Sequential, per-image re-statement of the official update rule (YBZh/OpenOOD-VLM)."""
    k, texts = len(t_id), np.concatenate([t_id, t_neg])
    memory: dict[int, list[tuple[float, np.ndarray]]] = {}
    out = []
    for x in batches:
        xn = unit(x)
        logits = xn @ texts.T / tau
        vanilla = _grouped_mass(logits[:, :k], logits[:, k:], groups)
        for i in range(len(xn)):
            if vanilla[i] > gamma + gap * (1 - gamma):
                slot, ent = int(np.argmax(logits[i, :k])), _entropy(logits[i, :k])
            elif vanilla[i] < gamma - gap * gamma:
                slot, ent = k + int(np.argmax(logits[i, k:])), _entropy(logits[i, k:])
            else:
                continue
            cell = memory.setdefault(slot, [])
            if len(cell) < size:
                cell.append((ent, xn[i]))
            else:
                worst = int(np.argmax([e for e, _ in cell]))
                if ent < cell[worst][0]:
                    cell[worst] = (ent, xn[i])
        adaptive = logits.copy()
        for slot, cell in memory.items():
            entries = np.stack([texts[slot]] + [f for _, f in cell])
            for b in range(len(xn)):
                if sample_adaptive:
                    w = np.exp(-beta * (1 - entries @ xn[b]))
                    proxy = unit((w[:, None] * entries).sum(0))
                else:
                    proxy = unit(entries.sum(0))
                adaptive[b, slot] = proxy @ xn[b] / tau
        ada = _grouped_mass(adaptive[:, :k], adaptive[:, k:], groups)
        out.append(-(ada + lam * vanilla))
    return np.concatenate(out), {s: len(c) for s, c in memory.items()}


def _adaneg_setup(sample_adaptive: bool, **overrides):
    rng = np.random.default_rng(11)
    words = [f"id{i}" for i in range(3)] + [f"neg{i}" for i in range(8)]
    vocab = {w: rng.standard_normal(8) for w in words}
    enc = VocabEncoder(vocab, ident="ada")
    params = dict(
        classes=words[:3], negatives=words[3:], ngroups=3, temperature=0.1, memory_size=2, batch_size=4,
        sample_adaptive=sample_adaptive, beta=2.0, gap=0.3, vanilla_weight=0.1,
        official=False, recipe="oodscope-v1",  # oodscope's earlier reading (L images); official: test_vlm_fidelity
    )
    params.update(overrides)
    det = create("adaneg", **params).fit(text_encoder=enc)
    # images near ID texts and near negative texts, interleaved, plus noise
    centers = np.stack([vocab[w] for w in words])
    pick = rng.integers(0, len(words), 24)
    x = unit(centers[pick]) + 0.35 * rng.standard_normal((24, 8))
    t_id, t_neg = unit(centers[:3]), unit(centers[3:])
    return det, x, t_id, t_neg


@pytest.mark.parametrize("sample_adaptive", [False, True])
def test_adaneg_matches_sequential_reference(sample_adaptive: bool) -> None:
    det, x, t_id, t_neg = _adaneg_setup(sample_adaptive)
    batches = [x[i : i + 4] for i in range(0, 24, 4)]
    ref, counts = adaneg_reference(
        batches, t_id, t_neg, det.state_["negative_group"].numpy(), tau=0.1, size=2, gamma=0.5, gap=0.3,
        lam=0.1, sample_adaptive=sample_adaptive, beta=2.0,
    )
    got = np.concatenate([det.score(b) for b in batches])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)
    assert det.memory_counts == counts
    assert any(c == 2 for c in counts.values()) and any(s >= 3 for s in counts)  # full ID and OOD slots
    assert max(det.memory_counts.values()) <= 2  # bounded memory


def test_adaneg_determinism_reset_chunking_and_order() -> None:
    det, x, *_ = _adaneg_setup(False)
    first = det.score(x)  # one call, streamed internally in batches of 4
    twin, *_ = _adaneg_setup(False)
    np.testing.assert_array_equal(np.concatenate([twin.score(x[i : i + 8]) for i in range(0, 24, 8)]), first)
    np.testing.assert_array_equal(det.reset().score(x), first)
    assert det.memory_counts == twin.memory_counts
    det.reset()
    later = np.concatenate([det.score(x[12:]), det.score(x[:12])])
    assert not np.allclose(later[12:], first[:12])  # test-time adaptation: the stream order matters


def test_adaneg_without_caching_is_scaled_neglabel() -> None:
    # gap = 1: thresholds 1 and 0 are never crossed, nothing is cached, proxies stay the texts.
    det, x, *_ = _adaneg_setup(False, gap=1.0)
    neg = create(
        "neglabel", classes=det.classes, negatives=det.negatives, ngroups=3, temperature=0.1, recipe="oodscope-v1"
    ).fit(text_encoder=_adaneg_encoder())
    np.testing.assert_allclose(det.score(x), 1.1 * neg.score(x), rtol=1e-6)
    assert det.memory_counts == {}


def _adaneg_encoder() -> VocabEncoder:
    rng = np.random.default_rng(11)
    words = [f"id{i}" for i in range(3)] + [f"neg{i}" for i in range(8)]
    return VocabEncoder({w: rng.standard_normal(8) for w in words}, ident="ada")


def test_adaneg_save_mid_stream_resumes(tmp_path: Path) -> None:
    det, x, *_ = _adaneg_setup(True)
    det.score(x[:8])
    det.save(tmp_path / "ada")
    resumed = load(tmp_path / "ada")
    np.testing.assert_allclose(resumed.score(x[8:]), det.score(x[8:]), rtol=1e-6)
    assert resumed.memory_counts == det.memory_counts


# --------------------------------------------------------------------------- CLIPN
def _tiny_clipn_no_encoder(directory: Path, dim: int = 8) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, PreTrainedTokenizerFast

    words = ["[UNK]", "<|startoftext|>", "<|endoftext|>", "a", "photo", "of", "the", ".", "cat", "dog", "bird"]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 1), ("<|endoftext|>", 2)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", unk_token="[UNK]", model_max_length=16,
    ).save_pretrained(directory)
    config = CLIPTextConfig(
        vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, projection_dim=dim, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    torch.manual_seed(0)
    CLIPTextModelWithProjection(config).eval().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def clipn_dir(tmp_path_factory) -> Path:
    return _tiny_clipn_no_encoder(tmp_path_factory.mktemp("clipn_no"))


def _direct_no_embeddings(directory: Path, texts: list[str]) -> np.ndarray:
    from transformers import CLIPTextModelWithProjection, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(directory))
    model = CLIPTextModelWithProjection.from_pretrained(str(directory)).eval()
    rows = []
    with torch.no_grad():
        for text in texts:  # one at a time: no padding involved in the reference
            ids = tok(text, return_tensors="pt")
            rows.append(model(input_ids=ids["input_ids"]).text_embeds[0].double().numpy())
    return unit(np.stack(rows))


def test_clipn_no_text_encoder_loads_offline(clipn_dir: Path) -> None:
    from oodscope.backbones.clipn_text import CLIPNNoTextEncoder

    enc = CLIPNNoTextEncoder(clipn_dir, batch_size=2)
    texts = ["a photo of a cat .", "the dog", "a bird", "zebra"]
    got = enc.encode_texts(texts)
    assert got.shape == (4, 8) and got.dtype == np.float32
    np.testing.assert_allclose(got, _direct_no_embeddings(clipn_dir, texts), atol=1e-5)
    assert enc.weights_fingerprint() == CLIPNNoTextEncoder(clipn_dir).weights_fingerprint()
    with pytest.raises(FileNotFoundError):
        CLIPNNoTextEncoder(clipn_dir / "missing")


@pytest.mark.parametrize("mode", ["atd", "ctw"])
def test_clipn_end_to_end_matches_numpy(clipn_dir: Path, mode: str, tmp_path: Path) -> None:
    from oodscope.backbones.clipn_text import CLIPNNoTextEncoder

    templates = ["a photo of a {} .", "the {}"]
    yes_encoder = HashEncoder(dim=8)
    det = create("clipn", classes=CLASSES, templates=templates, mode=mode)
    det.fit(text_encoder=yes_encoder, no_text_encoder=CLIPNNoTextEncoder(clipn_dir))

    def ensembled(rows_per_class):
        return unit(np.stack([unit(r).mean(0) for r in rows_per_class]))

    prompts = [[t.format(c) for t in templates] for c in CLASSES]
    t_yes = ensembled([yes_encoder.encode_texts(p).astype(np.float64) for p in prompts])
    t_no = ensembled([_direct_no_embeddings(clipn_dir, p) for p in prompts])
    x = np.random.default_rng(4).standard_normal((6, 8))
    yes, no = cos(x, t_yes) / 0.01, cos(x, t_no) / 0.01
    p_yes = 1.0 / (1.0 + np.exp(no - yes))
    if mode == "atd":
        expected = 1.0 - (softmax(yes) * p_yes).sum(axis=1)
    else:
        expected = 1.0 - p_yes[np.arange(6), yes.argmax(axis=1)]
    got = det.score(x)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert np.all((got >= 0) & (got <= 1))

    det.save(tmp_path / "clipn")
    np.testing.assert_array_equal(load(tmp_path / "clipn").score(x), got)
    by_path = create("clipn", classes=CLASSES, templates=templates, mode=mode, no_encoder=str(clipn_dir))
    np.testing.assert_allclose(by_path.fit(text_encoder=yes_encoder).score(x), got, rtol=1e-6)


def test_clipn_needs_the_no_encoder() -> None:
    with pytest.raises(DetectorError, match="no_text_encoder"):
        create("clipn", classes=CLASSES).fit(text_encoder=HashEncoder(8))
    with pytest.raises(DetectorError, match="mode"):
        create("clipn", classes=CLASSES, mode="max")


# --------------------------------------------------------------------------- persistence, all methods
def _fitted(name: str):
    enc = VocabEncoder(VOCAB)
    extra = {
        "mcm": {},
        "glmcm": {},
        "neglabel": {"negatives": ["stone", "windy\tadj", "car", "tree"], "ngroups": 2, "temperature": 0.3},
        "eoe": {"outlier_classes": ["car", "tree"]},
        "adaneg": {"negatives": ["stone", "windy\tadj", "car", "tree"], "ngroups": 2, "temperature": 0.3},
    }[name]
    return create(name, classes=CLASSES, **extra).fit(text_encoder=enc)


@pytest.mark.parametrize("name", ["mcm", "glmcm", "neglabel", "eoe", "adaneg"])
def test_save_load_scores_identically_without_text_encoder(name: str, tmp_path: Path) -> None:
    det = _fitted(name)
    feats = Features(embedding=X.astype(np.float32), patches=_patches(2).astype(np.float32))
    det.save(tmp_path / name, backbone_id="vocab")
    loaded = load(tmp_path / name, expected_backbone_id="vocab")
    assert loaded.get_params() == det.get_params()
    np.testing.assert_array_equal(loaded.score(feats), det.score(feats))
    if name in ("neglabel", "adaneg"):
        assert loaded.fit_info_["negative_words"] == ["stone", "windy", "car", "tree"]
        assert loaded.negative_lexicon.pos == ("noun", "adj", "noun", "noun")


# --------------------------------------------------------------------------- real backbone smoke test
@pytest.mark.slow
def test_zero_shot_detectors_on_the_packaged_conse_backbone(tmp_path: Path) -> None:
    from oodscope.backbones import create as create_backbone

    try:
        backbone = create_backbone("conse:effnet-lite0", patches=True)
    except (ImportError, FileNotFoundError) as err:
        pytest.skip(f"packaged backbone unavailable: {err}")
    size = backbone.input_spec.size
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    feats = backbone.encode_images(images)
    classes = ["goldfish", "tabby cat", "sports car"]
    corpus = {"categories": ["noun.shape"], "single_word": True}
    for name, extra in [
        ("mcm", {}),
        ("glmcm", {}),
        ("eoe", {"outlier_classes": ["mountain", "river"]}),
        ("neglabel", {"num_negatives": 50, "ngroups": 5, "corpus_options": corpus}),
        ("adaneg", {"num_negatives": 50, "corpus_options": corpus}),
    ]:
        det = create(name, classes=classes, **extra).fit(text_encoder=backbone)
        scores = det.score(feats)
        assert scores.shape == (3,) and np.all(np.isfinite(scores)), name
        det.save(tmp_path / name)
        if name == "adaneg":
            det.reset()
        np.testing.assert_allclose(load(tmp_path / name).score(feats), det.score(feats), rtol=1e-6)
