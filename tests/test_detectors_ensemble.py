"""Score-level ensembles of registered detectors: z-score and rank (empirical CDF) combinations.

The combination is checked against NumPy applied to the members' raw scores (from separately
fitted copies of the members), plus properties: one member = a monotone transform of it, weights,
calibration data, nested persistence, vision-language members, errors.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from oodscope.backbones.base import Features
from oodscope.detectors import DetectorError, create, load
from oodscope.evaluation.metrics import auroc
from oodscope.text.prompts import TextEmbeddingCache


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


class VocabEncoder:
    def __init__(self, vocab: dict[str, np.ndarray]) -> None:
        self.vocab = {w: unit(v) for w, v in vocab.items()}
        self.id = "ensemble-vocab"

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        rows = []
        for text in texts:
            hits = [w for w in re.findall(r"[a-z]+", text.lower()) if w in self.vocab]
            rows.append(self.vocab[hits[0]])
        return np.asarray(rows, dtype=np.float32)


CLASSES = ["cat", "dog", "bird"]
ENC = VocabEncoder({"cat": np.eye(5)[0], "dog": np.eye(5)[1], "bird": np.eye(5)[2] + 0.5 * np.eye(5)[0]})


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch):
    import oodscope.text.prompts as prompts

    monkeypatch.setattr(prompts, "_DEFAULT_CACHE", TextEmbeddingCache())


def make(n_per_class: int, seed: int, shift: float = 0.0) -> tuple[Features, np.ndarray]:
    """Features with an embedding (5-d), penultimate (6-d) and logits (3 classes) per image."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), n_per_class)
    emb = np.eye(5)[y] + 0.4 * rng.standard_normal((len(y), 5)) + shift * np.eye(5)[4]
    pen = 2.0 * np.eye(6)[y] + rng.standard_normal((len(y), 6)) + shift
    logits = 3.0 * np.eye(3)[y] + rng.standard_normal((len(y), 3)) - shift * np.eye(3)[y]
    feats = Features(
        embedding=emb.astype(np.float32), penultimate=pen.astype(np.float32), logits=logits.astype(np.float32)
    )
    return feats, y


FIT, Y = make(6, seed=0)
CAL, _ = make(4, seed=1)
ID_TEST, _ = make(5, seed=2)
OOD_TEST, _ = make(5, seed=3, shift=2.5)
TEST = Features.concatenate([ID_TEST, OOD_TEST])

MEMBERS = [
    ("knn", {"k": 2, "feature": "embedding"}),
    ("mahalanobis", {"feature": "penultimate"}),
    ("msp", {}),
]


def raw_scores(members, fit, y, data, **fit_kwargs) -> np.ndarray:
    """Each member fitted on its own (independently of the ensemble) and its raw scores (N, M)."""
    cols = []
    for name, params in members:
        det = create(name, **params)
        if det.needs_fit:
            det.fit(fit, y if det.needs_labels else None, **fit_kwargs)
        cols.append(det.score(data))
    return np.stack(cols, axis=1)


@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 0.5]])
def test_zscore_ensemble_matches_numpy(weights) -> None:
    ens = create("score_ensemble", members=MEMBERS, combination="zscore", weights=weights).fit(FIT, Y)
    ref = raw_scores(MEMBERS, FIT, Y, FIT)
    z = (raw_scores(MEMBERS, FIT, Y, TEST) - ref.mean(axis=0)) / ref.std(axis=0)
    w = np.ones(3) if weights is None else np.asarray(weights)
    got = ens.score(TEST)
    assert got.dtype == np.float64 and got.shape == (len(TEST),)
    np.testing.assert_allclose(got, z @ (w / w.sum()), rtol=1e-9)
    np.testing.assert_allclose(ens.member_scores(TEST), raw_scores(MEMBERS, FIT, Y, TEST), rtol=1e-12)


@pytest.mark.parametrize("weights", [None, [0.0, 1.0, 3.0]])
def test_rank_ensemble_matches_numpy(weights) -> None:
    ens = create("score_ensemble", members=MEMBERS, combination="rank", weights=weights).fit(FIT, Y)
    ref = raw_scores(MEMBERS, FIT, Y, FIT)
    w = np.ones(3) if weights is None else np.asarray(weights)
    for data in (TEST, FIT):  # on FIT every score ties with a reference score: "<=" counts it
        test = raw_scores(MEMBERS, FIT, Y, data)
        # empirical CDF of the ID fit scores, member by member: fraction of ID scores <= s
        cdf = np.stack([(ref[None, :, m] <= test[:, m, None]).mean(axis=1) for m in range(3)], axis=1)
        got = ens.score(data)
        np.testing.assert_allclose(got, cdf @ (w / w.sum()), rtol=1e-12)
        assert np.all((got >= 0) & (got <= 1))


def test_calibration_features_set_the_statistics() -> None:
    ens = create("score_ensemble", members=MEMBERS).fit(FIT, Y, calibration=CAL)
    ref = raw_scores(MEMBERS, FIT, Y, CAL)  # members still fitted on FIT, statistics from CAL
    z = (raw_scores(MEMBERS, FIT, Y, TEST) - ref.mean(axis=0)) / ref.std(axis=0)
    np.testing.assert_allclose(ens.score(TEST), z.mean(axis=1), rtol=1e-9)
    assert ens.fit_info_["num_calibration"] == len(CAL)


@pytest.mark.parametrize("combination", ["zscore", "rank"])
@pytest.mark.parametrize("member", MEMBERS)
def test_single_member_is_a_monotone_transform_of_it(combination: str, member) -> None:
    ens = create("score_ensemble", members=[member], combination=combination).fit(FIT, Y)
    alone = raw_scores([member], FIT, Y, TEST)[:, 0]
    got = ens.score(TEST)
    order = np.argsort(alone, kind="stable")
    assert np.all(np.diff(got[order]) >= -1e-12)  # never reverses the member's order
    if combination == "zscore":  # strictly increasing (affine): identical ranking and AUROC
        np.testing.assert_array_equal(np.argsort(got, kind="stable"), np.argsort(alone, kind="stable"))
        n = len(ID_TEST)
        assert auroc(got[:n], got[n:]) == auroc(alone[:n], alone[n:])


def test_ensemble_detects_the_shifted_data() -> None:
    n = len(ID_TEST)
    for combination in ("zscore", "rank"):
        ens = create("score_ensemble", members=MEMBERS, combination=combination).fit(FIT, Y, calibration=CAL)
        s = ens.score(TEST)
        assert auroc(s[:n], s[n:]) > 0.9


@pytest.mark.parametrize("combination", ["zscore", "rank"])
def test_save_load_nested_members(combination: str, tmp_path: Path) -> None:
    inner = {"members": [("mahalanobis", {"feature": "embedding"}), ("msp", {})], "combination": "rank"}
    members = [*MEMBERS[:2], ("score_ensemble", inner)]
    ens = create("score_ensemble", members=members, combination=combination, weights=[1, 1, 2]).fit(FIT, Y)
    ens.save(tmp_path / "ens", backbone_id="toy")
    config = json.loads((tmp_path / "ens" / "detector.json").read_text())
    assert [m[0] for m in config["params"]["members"]] == ["knn", "mahalanobis", "score_ensemble"]
    assert any(k.startswith("m2.m0.") for k in ens.state_) and any(k.startswith("m0.") for k in ens.state_)
    loaded = load(tmp_path / "ens", expected_backbone_id="toy")
    assert loaded.get_params() == ens.get_params()
    np.testing.assert_array_equal(loaded.score(TEST), ens.score(TEST))


def test_vision_language_members_get_the_text_encoder(tmp_path: Path) -> None:
    saturated = create("score_ensemble", members=[("gda", {"classes": CLASSES})])
    with pytest.raises(DetectorError, match="same score"):  # MSP of 100 * cos is -1 on all fit images
        saturated.fit(FIT, Y, text_encoder=ENC)
    members = [("gda", {"classes": CLASSES, "scoring": "energy"}), ("mcm", {"classes": CLASSES, "temperature": 0.05})]
    ens = create("score_ensemble", members=members)
    assert ens.fit_needs().labels and ens.fit_needs().text_encoder and ens.fields() == ("embedding",)
    with pytest.raises(DetectorError, match="text_encoder"):
        ens.fit(FIT, Y)
    ens.fit(FIT, Y, text_encoder=ENC)
    alone = raw_scores(members, FIT, Y, FIT, text_encoder=ENC)
    z = (raw_scores(members, FIT, Y, TEST, text_encoder=ENC) - alone.mean(axis=0)) / alone.std(axis=0)
    np.testing.assert_allclose(ens.score(TEST), z.mean(axis=1), rtol=1e-6)
    ens.save(tmp_path / "vl")
    np.testing.assert_array_equal(load(tmp_path / "vl").score(TEST), ens.score(TEST))


def test_errors() -> None:
    with pytest.raises(DetectorError, match="unknown detector"):
        create("score_ensemble", members=[("nope", {})])
    with pytest.raises(DetectorError, match="non-empty"):
        create("score_ensemble", members=[])
    with pytest.raises(DetectorError, match="weights"):
        create("score_ensemble", members=MEMBERS, weights=[1.0])
    with pytest.raises(DetectorError, match="weights"):
        create("score_ensemble", members=MEMBERS, weights=[0, 0, 0])
    with pytest.raises(DetectorError, match="combination"):
        create("score_ensemble", members=MEMBERS, combination="max")
    ens = create("score_ensemble", members=MEMBERS)
    with pytest.raises(DetectorError, match="fit"):
        ens.score(TEST)
    with pytest.raises(DetectorError, match="labels"):
        ens.fit(FIT)
    # a member that scores every calibration image the same has no z-score
    flat = Features(embedding=FIT.embedding, logits=np.zeros((len(Y), 3), np.float32))
    with pytest.raises(DetectorError, match="rank"):
        create("score_ensemble", members=[("msp", {})]).fit(flat)
    assert np.all(create("score_ensemble", members=["msp"], combination="rank").fit(flat).score(TEST) >= 0)
