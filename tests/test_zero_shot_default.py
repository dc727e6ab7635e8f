"""Issue 16: ConSE's label-text options, the label_vocabulary detector, the classifier ensemble and the
openclipart benchmark — each against an independent computation on tiny inputs."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from oodscope.backbones.base import Features, InputSpec
from oodscope.backbones.classifier_ensemble import ClassifierEnsemble, combine
from oodscope.backbones.conse import DEFAULT_LABEL_TEXT, LABEL_TEXTS, ConSE, imagenet_label_texts
from oodscope.detectors import create, load
from oodscope.detectors.base import DetectorError
from oodscope.text.prompts import TextEmbeddingCache

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- a tiny text space
class TableEncoder:
    """Texts -> fixed vectors (unit-normalized): a lookup table, else a seeded pseudo-random vector."""

    def __init__(self, table: dict[str, list[float]], dim: int = 3) -> None:
        self.table = {k: np.asarray(v, dtype=np.float64) for k, v in table.items()}
        self.dim = dim
        self.id = "table-" + hashlib.sha256(repr(sorted(table.items())).encode()).hexdigest()[:10]

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        rows = []
        for t in texts:
            if t in self.table:
                v = self.table[t]
            else:
                seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little")
                v = np.random.default_rng(seed).standard_normal(self.dim)
            rows.append(v / np.linalg.norm(v))
        return np.asarray(rows, dtype=np.float32)

    def weights_fingerprint(self) -> str:
        return self.id


# ID classes "cat", "car" and five classifier labels in a 3-d text space.
TABLE = {
    "cat": [1.0, 0.0, 0.0], "car": [0.0, 1.0, 0.0],
    "tabby": [0.9, 0.1, 0.1], "lion": [0.7, 0.0, 0.6], "sports car": [0.1, 0.95, 0.1],
    "tree": [0.0, 0.1, 1.0], "lake": [0.1, -0.2, 0.9],
}
LABELS = ["tabby", "lion", "sports car", "tree", "lake"]
CLASSES = ["cat", "car"]
LOGITS = np.array([[3.0, 1.0, 0.0, -1.0, 0.0],   # a cat
                   [0.0, 0.0, 4.0, 0.5, 0.0],    # a car
                   [-1.0, 0.0, 0.0, 3.0, 2.5],   # a landscape: mass on unrelated labels
                   [0.0, 0.0, 0.0, 0.0, 0.0]], dtype=np.float32)


def reference_score(logits: np.ndarray, weighting: str, top_k: int = 1, temperature: float = 0.05) -> np.ndarray:
    """Independent statement of the formula with loops (module docstring of label_vocabulary)."""
    enc = TableEncoder(TABLE)
    t = enc.encode_texts(CLASSES).astype(np.float64)
    s = enc.encode_texts(LABELS).astype(np.float64)
    weights = []
    for j in range(len(LABELS)):
        if weighting == "top_k":
            related = False
            for k in range(len(CLASSES)):
                cos = [float(t[k] @ s[i]) for i in range(len(LABELS))]
                rank = sorted(range(len(LABELS)), key=lambda i: -cos[i])
                related |= j in rank[:top_k]
            weights.append(1.0 if related else 0.0)
        else:
            best = 0.0
            for k in range(len(CLASSES)):
                cos = [float(t[k] @ s[i]) for i in range(len(LABELS))]
                best = max(best, float(np.exp((cos[j] - max(cos)) / temperature)))
            weights.append(best)
    out = []
    for row in logits.astype(np.float64):
        p = np.exp(row - row.max())
        p /= p.sum()
        out.append(-sum(p[j] * weights[j] for j in range(len(LABELS))))
    return np.asarray(out)


def fitted(**params) -> object:
    det = create("label_vocabulary", classes=CLASSES, **params)
    return det.fit(text_encoder=TableEncoder(TABLE), cache=TextEmbeddingCache(), label_texts=LABELS)


def feats(logits: np.ndarray) -> Features:
    return Features(embedding=np.zeros((len(logits), 3), np.float32), logits=logits)


# --------------------------------------------------------------------------- label_vocabulary
@pytest.mark.parametrize("params", [
    {"weighting": "top_k", "top_k": 1}, {"weighting": "top_k", "top_k": 2}, {"weighting": "top_k", "top_k": 5},
    {"weighting": "soft", "temperature": 0.05}, {"weighting": "soft", "temperature": 0.5},
])
def test_label_vocabulary_matches_the_formula(params):
    det = fitted(**params)
    expected = reference_score(LOGITS, params["weighting"], params.get("top_k", 1),
                               params.get("temperature", 0.05))
    np.testing.assert_allclose(det.score(feats(LOGITS)), expected, rtol=1e-6, atol=1e-9)


def test_label_vocabulary_default_is_the_measured_soft_weighting():
    det = create("label_vocabulary", classes=CLASSES)
    assert (det.weighting, det.temperature) == ("soft", 0.05)
    fitted_default = det.fit(text_encoder=TableEncoder(TABLE), cache=TextEmbeddingCache(), label_texts=LABELS)
    np.testing.assert_allclose(fitted_default.score(feats(LOGITS)), reference_score(LOGITS, "soft"), rtol=1e-6)


def test_label_vocabulary_hand_checked_case():
    # top_k=1: "cat" -> tabby, "car" -> sports car; lion, tree, lake are the negatives.
    det = fitted(weighting="top_k", top_k=1)
    np.testing.assert_array_equal(det.related_labels(), [1, 0, 1, 0, 0])
    p = np.exp(LOGITS[0].astype(np.float64)) / np.exp(LOGITS[0].astype(np.float64)).sum()
    assert det.score(feats(LOGITS[:1]))[0] == pytest.approx(-(p[0] + p[2]), rel=1e-9)
    scores = det.score(feats(LOGITS))
    assert scores[2] > scores[0] and scores[2] > scores[1]  # the landscape is the most OOD
    # all labels related: every image gets minus the whole mass, -1
    np.testing.assert_allclose(fitted(weighting="top_k", top_k=5).score(feats(LOGITS)), -1.0)


def test_more_mass_on_a_related_label_lowers_the_score():
    det = fitted(weighting="soft", temperature=0.1)
    base = det.score(feats(LOGITS))
    bumped = LOGITS.copy()
    bumped[:, 0] += 1.0  # tabby: the nearest label to "cat", weight 1
    assert np.all(det.score(feats(bumped)) < base)


def test_label_vocabulary_is_deterministic_and_saves(tmp_path):
    a, b = fitted(weighting="top_k", top_k=2), fitted(weighting="top_k", top_k=2)
    for key in a.state_:
        assert torch.equal(a.state_[key], b.state_[key])
    np.testing.assert_array_equal(a.score(feats(LOGITS)), b.score(feats(LOGITS)))
    a.save(tmp_path / "det")
    again = load(tmp_path / "det")
    np.testing.assert_array_equal(again.score(feats(LOGITS)), a.score(feats(LOGITS)))
    assert again.get_params() == a.get_params()


def test_label_vocabulary_uses_the_encoders_label_embeddings():
    enc = TableEncoder(TABLE)

    class WithLabels(TableEncoder):
        label_embeddings = torch.from_numpy(enc.encode_texts(LABELS))

    det = create("label_vocabulary", classes=CLASSES, weighting="top_k", top_k=1).fit(text_encoder=WithLabels(TABLE),
                                                                    cache=TextEmbeddingCache())
    np.testing.assert_allclose(det.score(feats(LOGITS)), fitted(weighting="top_k", top_k=1).score(feats(LOGITS)),
                               rtol=1e-6)


def test_label_vocabulary_refuses_what_it_cannot_use():
    with pytest.raises(DetectorError, match="label texts|label_texts"):
        create("label_vocabulary", classes=CLASSES).fit(text_encoder=TableEncoder(TABLE), cache=TextEmbeddingCache())
    with pytest.raises(DetectorError, match="logits"):
        fitted(weighting="top_k", top_k=1).score(feats(LOGITS[:, :4]))
    for bad in ({"weighting": "hard"}, {"top_k": 0}, {"temperature": 0.0}):
        with pytest.raises(DetectorError):
            create("label_vocabulary", classes=CLASSES, **bad)


# --------------------------------------------------------------------------- ConSE label texts
def test_label_texts_come_from_the_shipped_wordnet_data():
    data = json.loads((ROOT / "src/oodscope/data/imagenet_glosses.json").read_text())["classes"]
    classes = json.loads((ROOT / "src/oodscope/data/imagenet_classes.json").read_text())["classes"]
    assert [c["wnid"] for c in data] == [c["wnid"] for c in classes]
    jersey = [c["wnid"] for c in classes].index("n03595614")
    assert imagenet_label_texts("lemmas")[jersey] == "jersey, T-shirt, tee shirt"
    assert imagenet_label_texts("lemmas+gloss")[jersey] == "jersey, T-shirt, tee shirt: a close-fitting pullover shirt"
    # hypernyms without those on more than half of the 1,000 paths (entity ... artifact)
    assert imagenet_label_texts("lemmas+hypernyms")[jersey] == \
        "jersey, T-shirt, tee shirt (shirt, garment, clothing, covering)"
    counts: dict[str, int] = {}
    for c in data:
        for h in set(c["hypernyms"]):
            counts[h] = counts.get(h, 0) + 1
    common = {h for h, n in counts.items() if n > 500}
    assert common == {"entity", "physical entity", "object", "whole", "artifact"}
    both = imagenet_label_texts("lemmas+gloss+hypernyms")
    for i in (0, jersey, 999):
        kept = [h for h in data[i]["hypernyms"] if h not in common]
        assert both[i] == f"{', '.join(classes[i]['lemmas'])}: {data[i]['gloss']}" + (
            f" ({', '.join(kept)})" if kept else "")
    with pytest.raises(ValueError, match="label_text"):
        imagenet_label_texts("gloss")


class _Classifier:
    id = "tiny-classifier"
    input_spec = InputSpec(size=8, mean=(0.5,) * 3, std=(0.5,) * 3)
    device = "cpu"

    def weights_fingerprint(self) -> str:
        return "w0"


class _CountingEncoder(TableEncoder):
    def __init__(self) -> None:
        super().__init__({}, dim=4)
        self.calls = 0

    def encode_texts(self, texts):
        self.calls += 1
        return super().encode_texts(texts)


def test_conse_label_text_is_in_the_id_and_the_cache_key(tmp_path, monkeypatch):
    monkeypatch.setenv("OODSCOPE_CACHE", str(tmp_path))
    encoder = _CountingEncoder()
    default = ConSE(_Classifier(), encoder)
    assert default.id == "conse:tiny-classifier" and default.label_text == DEFAULT_LABEL_TEXT
    others = {t: ConSE(_Classifier(), encoder, label_text=t) for t in LABEL_TEXTS if t != DEFAULT_LABEL_TEXT}
    for t, conse in others.items():
        assert conse.id == f"conse:tiny-classifier?text={t}"
        assert conse.label_texts == imagenet_label_texts(t)
    embeddings = {t: c.label_embeddings for t, c in {DEFAULT_LABEL_TEXT: default, **others}.items()}
    assert encoder.calls == len(LABEL_TEXTS)  # one encoding per option
    for t, emb in embeddings.items():
        np.testing.assert_allclose(emb.numpy(), encoder.encode_texts(imagenet_label_texts(t)[:]), atol=1e-6)
    assert len({hashlib.sha256(e.numpy().tobytes()).hexdigest() for e in embeddings.values()}) == len(LABEL_TEXTS)
    files = sorted((tmp_path / "conse-labels").glob("*.safetensors"))
    assert len(files) == len(LABEL_TEXTS)  # cached on disk, one file per text option
    with pytest.raises(ValueError, match="label_text"):
        ConSE(_Classifier(), encoder, label_text="glosses")


@pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").is_file(), reason="Debian wordnet-base not installed")
def test_gloss_data_is_reproducible_from_wordnet():
    out = subprocess.run([sys.executable, str(ROOT / "scripts/build_imagenet_glosses.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# --------------------------------------------------------------------------- classifier ensemble
class _Member:
    def __init__(self, name: str, size: int, scale: float) -> None:
        self.id, self.scale, self.device = name, scale, "cpu"
        self.input_spec = InputSpec(size=size, mean=(0.5,) * 3, std=(0.5,) * 3)
        self.seen: list[tuple[int, ...]] = []

    def weights_fingerprint(self) -> str:
        return self.id

    def encode_images(self, batch: torch.Tensor) -> Features:
        self.seen.append(tuple(batch.shape))
        pooled = batch.mean(dim=(2, 3)).numpy()  # (N, 3)
        logits = np.concatenate([pooled, -pooled], axis=1) * self.scale
        return Features(embedding=pooled, logits=logits.astype(np.float32), penultimate=pooled)


def test_ensemble_averages_the_members_probabilities():
    a, b = _Member("a", 8, 1.0), _Member("b", 12, 3.0)
    ens = ClassifierEnsemble([a, b])
    assert ens.id == "a+b" and ens.input_spec.size == 12
    batch = torch.linspace(-1, 1, 2 * 3 * 12 * 12).reshape(2, 3, 12, 12)
    out = ens.encode_images(batch)
    assert a.seen == [(2, 3, 8, 8)] and b.seen == [(2, 3, 12, 12)]  # each member at its own size
    fa = a.encode_images(torch.nn.functional.interpolate(batch, size=(8, 8), mode="bicubic", antialias=True))
    fb = b.encode_images(batch)

    def softmax(z):
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    mean_p = (softmax(fa.logits.astype(np.float64)) + softmax(fb.logits.astype(np.float64))) / 2
    np.testing.assert_allclose(softmax(out.logits.astype(np.float64)), mean_p, atol=1e-6)
    np.testing.assert_allclose(np.exp(out.logits), mean_p, rtol=1e-5)  # logits are log mean probabilities
    assert out.penultimate.shape == (2, 6) and out.weight is None
    with pytest.raises(ValueError):
        combine([fa, Features(embedding=fa.embedding, logits=fa.logits[:, :3])], "x")
    with pytest.raises(ValueError):
        ClassifierEnsemble([a])


# --------------------------------------------------------------------------- the openclipart benchmark
@pytest.mark.skipif(not Path("/usr/share/openclipart/png/animals").is_dir(), reason="openclipart-png not installed")
def test_openclipart_benchmark_sets():
    import os

    from oodscope.io.registry import get_benchmark, get_dataset

    bench = get_benchmark("openclipart")
    assert bench.classes() == ["mammal", "bird", "bug", "fish"] and not bench.near
    ids = get_dataset(bench.id)
    assert len(ids) == 234 and np.bincount(ids.labels).tolist() == [118, 50, 49, 17]
    seen = {os.path.realpath(ids.item_id(i)) for i in range(len(ids))}
    assert len(seen) == len(ids)
    for name, spec in bench.far.items():
        source = get_dataset(spec)
        assert len(source) == get_dataset(spec).__len__() == {"food": 336, "vehicles": 94, "plants": 75}[name]
        paths = {os.path.realpath(source.item_id(i)) for i in range(len(source))}
        assert len(paths) == len(source) and not paths & seen  # distinct, and never an ID drawing


def test_spec_strings_name_the_options():
    from oodscope.backbones import create as create_backbone

    glossed = create_backbone("conse:effnet-lite0?text=lemmas+hypernyms", device="cpu")
    assert glossed.label_text == "lemmas+hypernyms" and glossed.id == "conse:effnet-lite0?text=lemmas+hypernyms"
    assert create_backbone(glossed.id, device="cpu").id == glossed.id  # the id is a spec again
    ensemble = create_backbone("conse:effnet-lite0+effnet-lite2", device="cpu")
    assert isinstance(ensemble.classifier, ClassifierEnsemble)
    assert ensemble.id == "conse:effnet-lite0+effnet-lite2" and ensemble.input_spec.size == 260


def test_conse_variants_share_the_text_cache_of_their_sentence_encoder():
    from oodscope.text.prompts import encoder_key

    encoder = TableEncoder(TABLE)
    a = ConSE(_Classifier(), encoder)
    b = ConSE(_Classifier(), encoder, label_text="lemmas+hypernyms")
    assert a.id != b.id and encoder_key(a) == encoder_key(b) == encoder_key(encoder)
    cache = TextEmbeddingCache()
    cache.encode(a, ["a photo of a cat."])
    cache.encode(b, ["a photo of a cat."])
    assert cache.encoded_count == 1
