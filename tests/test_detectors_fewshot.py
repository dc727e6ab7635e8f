"""Few-shot vision-language detectors (GDA, Tip-Adapter, linear probe, COOkeD) and the feature-space
detectors (KNN, Mahalanobis, relative Mahalanobis) on vision-language embeddings.

Each score is checked against an independent NumPy / scikit-learn computation of its formula on
tiny hand-made embeddings, plus properties (reductions to the zero-shot classifier, sign, batch
order, persistence, errors). One slow test runs the packaged ConSE backbone on Fashion-MNIST.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from sklearn.linear_model import LogisticRegression

from oodscope.backbones.base import Features
from oodscope.detectors import DetectorError, create, load
from oodscope.text.prompts import TextEmbeddingCache


# --------------------------------------------------------------------------- tiny text encoder
def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


class VocabEncoder:
    """A prompt's embedding is the vector of the one vocabulary word it contains."""

    def __init__(self, vocab: dict[str, np.ndarray]) -> None:
        self.vocab = {w: unit(v) for w, v in vocab.items()}
        content = repr(sorted((w, tuple(v)) for w, v in self.vocab.items())).encode()
        self.id = f"fewshot-vocab-{hashlib.sha256(content).hexdigest()[:8]}"

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        out = []
        for text in texts:
            hits = [w for w in re.findall(r"[a-z]+", text.lower()) if w in self.vocab]
            if len(set(hits)) != 1:
                raise KeyError(f"{text!r} names {hits}, not exactly one vocabulary word")
            out.append(self.vocab[hits[0]])
        return np.asarray(out, dtype=np.float32)


E = np.eye(4)
VOCAB = {"cat": E[0], "dog": E[1], "bird": E[0] + E[1] + E[2], "stone": E[3]}
CLASSES = ["cat", "dog", "bird"]
T_ID = unit(np.stack([VOCAB[c] for c in CLASSES]))
ENC = VocabEncoder(VOCAB)


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch):
    import oodscope.text.prompts as prompts

    monkeypatch.setattr(prompts, "_DEFAULT_CACHE", TextEmbeddingCache())


def shots(per_class: int, seed: int = 0, noise: float = 0.35) -> tuple[np.ndarray, np.ndarray]:
    """Labelled ID embeddings scattered around each class text (not normalized: detectors do it)."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), per_class)
    x = T_ID[y] + noise * rng.standard_normal((len(y), 4)) * np.array([1.0, 1.0, 1.0, 0.3])
    return x * rng.uniform(0.5, 3.0, (len(y), 1)), y


XF, YF = shots(4)
X = np.array(
    [[1.0, 0.1, 0.0, 0.0], [0.2, 0.9, 0.1, 0.0], [0.3, 0.3, 0.3, 0.1], [0.0, 0.0, 0.2, 1.0], [-0.5, 0.1, 0.9, 0.4]]
)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def gen_reference(p: np.ndarray, gamma: float = 0.1, m: int = 100) -> np.ndarray:
    top = -np.sort(-p, axis=1)[:, : min(m, p.shape[1])]
    return (top**gamma * (1 - top) ** gamma).sum(axis=1)


def score_reference(logits: np.ndarray, scoring: str) -> np.ndarray:
    if scoring == "msp":
        return -softmax(logits).max(axis=1)
    if scoring == "energy":
        return -logsumexp(logits, axis=1)
    return gen_reference(softmax(logits))


def zero_shot_logits(x: np.ndarray, scale: float = 100.0) -> np.ndarray:
    return scale * unit(x) @ T_ID.T


# --------------------------------------------------------------------------- GDA
def gda_reference(xf: np.ndarray, yf: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Linear discriminant with the official code's precision estimator, written out in NumPy."""
    z = unit(xf)
    n, d = z.shape
    mu = np.stack([z[yf == c].mean(axis=0) for c in range(k)])
    dev = z - mu[yf]
    scatter = dev.T @ dev
    precision = d * np.linalg.inv(scatter + np.trace(scatter) / (n - 1) * np.eye(d))
    w = mu @ precision
    b = np.log(1.0 / k) - 0.5 * np.array([m @ precision @ m for m in mu])
    return w, b


@pytest.mark.parametrize("scoring", ["msp", "energy", "gen"])
@pytest.mark.parametrize("alpha", [1.0, 0.01])
def test_gda_matches_numpy_lda(alpha: float, scoring: str) -> None:
    det = create("gda", classes=CLASSES, alpha=alpha, scoring=scoring).fit(XF, YF, text_encoder=ENC)
    w, b = gda_reference(XF, YF, 3)
    np.testing.assert_allclose(det.state_["gda_weight"].numpy(), w, rtol=1e-9)
    np.testing.assert_allclose(det.state_["gda_bias"].numpy(), b, rtol=1e-9)
    logits = zero_shot_logits(X) + alpha * (unit(X) @ w.T + b)
    got = det.score(X)
    assert got.dtype == np.float64 and got.shape == (len(X),)
    np.testing.assert_allclose(got, score_reference(logits, scoring), rtol=1e-5, atol=1e-7)


def test_gda_classifier_is_the_bayes_posterior_of_tied_gaussians() -> None:
    # softmax(x W^T + b) must equal the class posterior computed from the Gaussian densities.
    det = create("gda", classes=CLASSES).fit(XF, YF, text_encoder=ENC)
    z = unit(XF)
    mu = np.stack([z[YF == c].mean(axis=0) for c in range(3)])
    dev = z - mu[YF]
    s = dev.T @ dev
    precision = 4 * np.linalg.inv(s + np.trace(s) / (len(z) - 1) * np.eye(4))
    diff = unit(X)[:, None, :] - mu[None]
    log_density = -0.5 * np.einsum("nkd,de,nke->nk", diff, precision, diff)
    got = torch.softmax(det.gda_logits(torch.tensor(X)), dim=1).numpy()
    np.testing.assert_allclose(got, softmax(log_density), rtol=1e-8)


def test_gda_and_tip_adapter_with_alpha_zero_are_the_zero_shot_classifier() -> None:
    mcm = create("mcm", classes=CLASSES, temperature=0.01).fit(text_encoder=ENC)
    for name in ("gda", "tip_adapter"):
        det = create(name, classes=CLASSES, alpha=0.0).fit(XF, YF, text_encoder=ENC)
        np.testing.assert_allclose(det.score(X), mcm.score(X), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(det.score(X), -softmax(zero_shot_logits(X)).max(axis=1), rtol=1e-6)


def test_gda_one_shot_has_no_scatter_and_falls_back_to_zero_shot() -> None:
    x1, y1 = shots(1, seed=3)
    det = create("gda", classes=CLASSES, alpha=5.0).fit(x1, y1, text_encoder=ENC)
    assert det.fit_info_["gda_degenerate"] is True and det.fit_info_["shots_min"] == 1
    np.testing.assert_array_equal(det.state_["gda_weight"].numpy(), 0.0)
    np.testing.assert_allclose(det.score(X), -softmax(zero_shot_logits(X)).max(axis=1), rtol=1e-6)


def test_gda_two_shots_singular_scatter_is_regularised() -> None:
    # 6 images, 3 classes: the scatter has rank <= 3 in 4-d, the ridge makes it invertible.
    x2, y2 = shots(2, seed=5)
    z = unit(x2)
    dev = z - np.stack([z[y2 == c].mean(axis=0) for c in range(3)])[y2]
    assert np.linalg.matrix_rank(dev.T @ dev) < 4
    det = create("gda", classes=CLASSES).fit(x2, y2, text_encoder=ENC)
    w, b = gda_reference(x2, y2, 3)
    assert det.fit_info_["gda_degenerate"] is False
    np.testing.assert_allclose(det.state_["gda_weight"].numpy(), w, rtol=1e-8)
    assert np.all(np.isfinite(det.score(X)))


def test_gda_needs_every_class() -> None:
    keep = YF != 2
    with pytest.raises(DetectorError, match="bird"):
        create("gda", classes=CLASSES).fit(XF[keep], YF[keep], text_encoder=ENC)


# --------------------------------------------------------------------------- Tip-Adapter
@pytest.mark.parametrize("scoring", ["msp", "energy", "gen"])
@pytest.mark.parametrize("alpha,beta", [(1.0, 5.5), (2.0, 1.0)])
def test_tip_adapter_matches_numpy(alpha: float, beta: float, scoring: str) -> None:
    det = create("tip_adapter", classes=CLASSES, alpha=alpha, beta=beta, scoring=scoring)
    det.fit(XF, YF, text_encoder=ENC)
    affinity = np.exp(-beta * (1.0 - unit(X) @ unit(XF).T))
    one_hot = np.eye(3)[YF]
    logits = zero_shot_logits(X) + alpha * affinity @ one_hot
    np.testing.assert_allclose(det.logits(torch.tensor(X)).numpy(), logits, rtol=1e-6)
    np.testing.assert_allclose(det.score(X), score_reference(logits, scoring), rtol=1e-5, atol=1e-7)


def test_tip_adapter_one_shot_and_cache_contents() -> None:
    x1, y1 = shots(1, seed=1)
    det = create("tip_adapter", classes=CLASSES).fit(x1, y1, text_encoder=ENC)
    np.testing.assert_allclose(det.state_["cache_keys"].numpy(), unit(x1), rtol=1e-6)
    np.testing.assert_array_equal(det.state_["cache_labels"].numpy(), y1)
    # an image equal to a cached key gets exp(0) = 1 added to that key's class
    cache = det.cache_logits(torch.tensor(x1[:1])).numpy()[0]
    assert cache[y1[0]] == pytest.approx(1.0)
    assert np.all(np.isfinite(det.score(X)))


# --------------------------------------------------------------------------- linear probe
def probe_data(seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    x, y = shots(6, seed=seed, noise=0.5)
    return x, y


@pytest.mark.parametrize("scoring", ["msp", "energy", "gen"])
def test_linear_probe_matches_sklearn(scoring: str) -> None:
    x, y = probe_data()
    det = create("linear_probe", C=0.7, scoring=scoring).fit(x, y)
    ref = LogisticRegression(C=0.7, max_iter=1000).fit(unit(x), y)
    probs = ref.predict_proba(unit(X))
    np.testing.assert_allclose(det.probabilities(torch.tensor(X)).numpy(), probs, atol=1e-5)
    expected = {
        "msp": -probs.max(axis=1),
        "energy": -logsumexp(ref.decision_function(unit(X)), axis=1),
        "gen": gen_reference(probs),
    }[scoring]
    np.testing.assert_allclose(det.score(X), expected, rtol=1e-4, atol=1e-5)


def test_linear_probe_gen_and_energy_parameters_reach_the_score() -> None:
    x, y = probe_data()
    probs = LogisticRegression(C=1.0, max_iter=1000).fit(unit(x), y).predict_proba(unit(X))
    det = create("linear_probe", scoring="gen", scoring_params={"gamma": 0.5, "M": 2}).fit(x, y)
    np.testing.assert_allclose(det.score(X), gen_reference(probs, 0.5, 2), rtol=1e-4)
    hot = create("linear_probe", scoring="energy", scoring_params={"temperature": 2.0}).fit(x, y)
    logits = hot.logits(torch.tensor(X)).numpy().astype(np.float64)
    np.testing.assert_allclose(hot.score(X), -2.0 * logsumexp(logits / 2.0, axis=1), rtol=1e-6)
    with pytest.raises(DetectorError, match="scoring"):
        create("linear_probe", scoring="mahalanobis")
    with pytest.raises(DetectorError, match="scoring_params"):
        create("linear_probe", scoring="gen", scoring_params={"nope": 1})


def test_linear_probe_feature_field_and_one_shot() -> None:
    x, y = probe_data()
    pen = np.random.default_rng(0).standard_normal((len(x), 7)) + 2 * np.eye(3, 7)[y]
    feats = Features(embedding=x.astype(np.float32), penultimate=pen.astype(np.float32))
    on_emb = create("linear_probe").fit(feats, y)
    assert on_emb.fit_info_["feature"] == "embedding"
    np.testing.assert_allclose(on_emb.score(feats), create("linear_probe").fit(x, y).score(x), rtol=1e-6)
    on_pen = create("linear_probe", feature="penultimate").fit(feats, y)
    ref = LogisticRegression(C=1.0, max_iter=1000).fit(unit(pen), y).predict_proba(unit(pen))
    np.testing.assert_allclose(on_pen.score(feats), -ref.max(axis=1), atol=1e-5)
    x1, y1 = shots(1)
    one = create("linear_probe").fit(x1, y1)  # one image per class still trains
    assert np.all(np.isfinite(one.score(X)))


# --------------------------------------------------------------------------- COOkeD
def cooked_inputs(seed: int = 4) -> tuple[dict, np.ndarray]:
    x, y = shots(5, seed=seed, noise=0.5)
    rng = np.random.default_rng(seed + 10)
    pen = rng.standard_normal((len(x), 6)) + 1.5 * np.eye(3, 6)[y]
    return {"embedding": x, "penultimate": pen, "logits": rng.standard_normal((len(x), 1000))}, y


def test_cooked_is_the_mean_of_three_softmaxes() -> None:
    fit, y = cooked_inputs()
    test, _ = cooked_inputs(seed=9)
    det = create("cooked", classes=CLASSES, C=0.5).fit(fit, y, text_encoder=ENC)
    p_cw = LogisticRegression(C=0.5, max_iter=1000).fit(unit(fit["penultimate"]), y)
    p_cw = p_cw.predict_proba(unit(test["penultimate"]))
    p_zs = softmax(zero_shot_logits(test["embedding"]))
    p_vlm = LogisticRegression(C=0.5, max_iter=1000).fit(unit(fit["embedding"]), y)
    p_vlm = p_vlm.predict_proba(unit(test["embedding"]))
    mean = (p_cw + p_zs + p_vlm) / 3
    members = det.member_probabilities(det._inputs(test)).numpy()
    for got, ref in zip(members, (p_cw, p_zs, p_vlm), strict=True):
        np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(det.score(test), -mean.max(axis=1), atol=1e-5)
    ent = create("cooked", classes=CLASSES, C=0.5, scoring="entropy").fit(fit, y, text_encoder=ENC)
    np.testing.assert_allclose(ent.score(test), -(mean * np.log(mean)).sum(axis=1), atol=1e-5)


def test_cooked_with_a_users_closed_world_logits() -> None:
    fit, y = cooked_inputs()
    own = np.random.default_rng(1).standard_normal((len(y), 3)) * 4  # "your model" over the 3 ID classes
    det = create("cooked", classes=CLASSES, closed_world="logits")
    assert det.fields() == ("embedding", "logits")
    det.fit({"embedding": fit["embedding"], "logits": own}, y, text_encoder=ENC)
    emb = unit(fit["embedding"])
    p_vlm = LogisticRegression(C=1.0, max_iter=1000).fit(emb, y).predict_proba(emb)
    mean = (softmax(own) + softmax(zero_shot_logits(fit["embedding"])) + p_vlm) / 3
    np.testing.assert_allclose(det.score({"embedding": fit["embedding"], "logits": own}), -mean.max(axis=1), atol=1e-5)
    with pytest.raises(DetectorError, match="closed_world='probe'"):
        det.score({"embedding": fit["embedding"], "logits": fit["logits"]})  # 1000 ImageNet logits
    with pytest.raises(DetectorError, match="closed_world"):
        create("cooked", classes=CLASSES, closed_world="other")


def test_cooked_reads_penultimate_from_features() -> None:
    fit, y = cooked_inputs()
    feats = Features(
        embedding=fit["embedding"].astype(np.float32),
        penultimate=fit["penultimate"].astype(np.float32),
        logits=fit["logits"].astype(np.float32),
    )
    det = create("cooked", classes=CLASSES).fit(feats, y, text_encoder=ENC)
    np.testing.assert_allclose(det.score(feats), det.score(fit), rtol=1e-5)
    with pytest.raises(DetectorError, match="penultimate"):
        det.score(Features(embedding=fit["embedding"].astype(np.float32)))


# --------------------------------------------------------------------------- shared properties
FEW_SHOT = {
    "gda": {},
    "tip_adapter": {},
    "cooked": {},
    "gda_energy": {"scoring": "energy"},
}


def _fitted(key: str):
    name = key.split("_energy")[0]
    fit, y = cooked_inputs()
    return create(name, classes=CLASSES, **FEW_SHOT[key]).fit(fit, y, text_encoder=ENC), fit


@pytest.mark.parametrize("key", list(FEW_SHOT))
def test_save_load_scores_identically_without_text_encoder(key: str, tmp_path: Path) -> None:
    det, fit = _fitted(key)
    test, _ = cooked_inputs(seed=7)
    det.save(tmp_path / key, backbone_id="vocab")
    loaded = load(tmp_path / key, expected_backbone_id="vocab")
    assert loaded.get_params() == det.get_params()
    np.testing.assert_array_equal(loaded.score(test), det.score(test))


def test_linear_probe_save_load(tmp_path: Path) -> None:
    x, y = probe_data()
    det = create("linear_probe", scoring="gen").fit(x, y)
    det.save(tmp_path / "probe")
    np.testing.assert_array_equal(load(tmp_path / "probe").score(X), det.score(X))


@pytest.mark.parametrize("key", list(FEW_SHOT))
def test_batch_order_norm_invariance_and_far_images(key: str) -> None:
    det, _ = _fitted(key)
    test, _ = cooked_inputs(seed=8)
    base = det.score(test)
    perm = np.random.default_rng(0).permutation(len(base))
    np.testing.assert_allclose(det.score({k: v[perm] for k, v in test.items()}), base[perm], rtol=1e-6)
    scaled = dict(test, embedding=test["embedding"] * 5.0)
    np.testing.assert_allclose(det.score(scaled), base, rtol=1e-6)  # embedding norm is irrelevant
    # an image on its class text (and typical penultimate) is less OOD than one far from all ID data
    near = {"embedding": T_ID[:1] * 2, "penultimate": 1.5 * np.eye(1, 6), "logits": test["logits"][:1]}
    far = {"embedding": E[3:4], "penultimate": -np.ones((1, 6)), "logits": test["logits"][:1]}
    assert det.score(near)[0] < det.score(far)[0]


def test_far_embedding_scores_higher_for_the_probe() -> None:
    x, y = probe_data()
    det = create("linear_probe").fit(x, y)
    near, far = det.score(np.stack([T_ID[1], E[3] - 0.3 * T_ID.sum(axis=0)]))
    assert near < far


def test_fit_contract_errors() -> None:
    for name in ("gda", "tip_adapter", "cooked"):
        det = create(name, classes=CLASSES)
        fit, y = cooked_inputs()
        with pytest.raises(DetectorError, match="fit"):
            det.score(fit)
        with pytest.raises(DetectorError, match="text_encoder"):
            det.fit(fit, y)
        with pytest.raises(DetectorError, match="labels"):
            det.fit(fit, text_encoder=ENC)
        with pytest.raises(DetectorError, match="features"):
            det.fit(None, y, text_encoder=ENC)
        with pytest.raises(DetectorError, match=r"\[0, 3\)"):
            det.fit(fit, np.full(len(y), 3), text_encoder=ENC)
        with pytest.raises(DetectorError, match="one label per image"):
            det.fit(fit, y[:-1], text_encoder=ENC)
        with pytest.raises(DetectorError, match="dimension"):
            det.fit({"embedding": np.ones((len(y), 5)), "penultimate": fit["penultimate"]}, y, text_encoder=ENC)
        assert not det.is_fitted_
        assert det.fit_needs().labels and det.fit_needs().text_encoder and det.fit_needs().features
    with pytest.raises(DetectorError, match="labels"):
        create("linear_probe").fit(XF)
    for bad in ({"alpha": -1.0}, {"logit_scale": 0.0}, {"scoring": "entropy"}):
        with pytest.raises(DetectorError):
            create("gda", classes=CLASSES, **bad)
    with pytest.raises(DetectorError, match="beta"):
        create("tip_adapter", classes=CLASSES, beta=-0.5)


# --------------------------------------------------------------------------- KNN / Mahalanobis on VLM embeddings
def vlm_features(n_per_class: int, seed: int) -> tuple[Features, np.ndarray]:
    x, y = shots(n_per_class, seed=seed)
    # As a vision-language backbone gives them: unit-norm embeddings with a logit scale.
    return Features(embedding=unit(x).astype(np.float32), logit_scale=100.0), y


def test_knn_on_normalized_vlm_embeddings_matches_numpy() -> None:
    fit, _ = vlm_features(5, seed=11)
    test, _ = vlm_features(3, seed=12)
    det = create("knn", k=3, feature="embedding").fit(fit)
    bank = unit(fit.embedding)
    dist = np.linalg.norm(unit(test.embedding)[:, None] - bank[None], axis=2)
    np.testing.assert_allclose(det.score(test), np.sort(dist, axis=1)[:, 2], rtol=1e-5, atol=1e-6)
    near, far = det.score(np.stack([T_ID[0], -T_ID[0]]))
    assert near < far


def _tied_pinv(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = np.stack([z[y == c].mean(axis=0) for c in np.unique(y)])
    dev = z - mu[y]
    return mu, np.linalg.pinv(dev.T @ dev / len(z), hermitian=True)


def test_mahalanobis_family_on_vlm_embeddings_matches_numpy() -> None:
    fit, y = vlm_features(6, seed=13)
    test, _ = vlm_features(2, seed=14)
    z, t = fit.embedding.astype(np.float64), test.embedding.astype(np.float64)
    mu, prec = _tied_pinv(z, y)
    d_c = np.stack([np.einsum("nd,de,ne->n", t - m, prec, t - m) for m in mu], axis=1)
    maha = create("mahalanobis", feature="embedding").fit(fit, y)
    np.testing.assert_allclose(maha.score(test), d_c.min(axis=1), rtol=1e-6)
    centre = z.mean(axis=0)
    prec0 = np.linalg.pinv((z - centre).T @ (z - centre) / len(z), hermitian=True)
    d_0 = np.einsum("nd,de,ne->n", t - centre, prec0, t - centre)
    rmd = create("relative_mahalanobis", feature="embedding").fit(fit, y)
    np.testing.assert_allclose(rmd.score(test), (d_c - d_0[:, None]).min(axis=1), rtol=1e-6, atol=1e-8)


def test_feature_space_detectors_pick_the_vlm_embedding_explicitly() -> None:
    # A ConSE-style Features has both: "auto" reads the classifier's penultimate, so the VLM
    # embedding must be asked for with feature="embedding".
    fit, y = vlm_features(5, seed=15)
    pen = np.random.default_rng(0).standard_normal((len(y), 9)).astype(np.float32)
    both = Features(embedding=fit.embedding, penultimate=pen)
    assert create("knn", k=2).fit(both).fit_info_["feature"] == "penultimate"
    det = create("knn", k=2, feature="embedding").fit(both)
    assert det.fit_info_["feature"] == "embedding"
    np.testing.assert_allclose(det.score(both), create("knn", k=2).fit(fit).score(fit), rtol=1e-6)


# --------------------------------------------------------------------------- real backbone
@pytest.mark.slow
def test_few_shot_detectors_on_fashion_mnist_with_conse(tmp_path: Path) -> None:
    from oodscope.backbones import create as create_backbone
    from oodscope.evaluation.metrics import auroc
    from oodscope.features.extract import extract
    from oodscope.io import fashion_mnist_ood

    try:
        backbone = create_backbone("conse:effnet-lite0")
        train = fashion_mnist_ood("train", per_class=20)
        test = fashion_mnist_ood("test", per_class=20)
    except (ImportError, FileNotFoundError) as err:
        pytest.skip(f"packaged backbone or Fashion-MNIST unavailable: {err}")
    fit = extract(backbone, train.id, num_workers=0, progress=False)
    id_test = extract(backbone, test.id, num_workers=0, progress=False).features
    ood_test = extract(backbone, test.near_ood, num_workers=0, progress=False).features
    names = train.id_class_names
    results = {}
    for name, det in [
        ("gda", create("gda", classes=names)),
        ("linear_probe", create("linear_probe")),
        ("cooked", create("cooked", classes=names, scoring="entropy")),
    ]:
        if name == "linear_probe":
            det.fit(fit.features, fit.labels)
        else:
            det.fit(fit.features, fit.labels, text_encoder=backbone)
        results[name] = auroc(det.score(id_test), det.score(ood_test))
        det.save(tmp_path / name)
        np.testing.assert_array_equal(load(tmp_path / name).score(ood_test), det.score(ood_test))
    assert results["gda"] > 0.62, results
    assert results["linear_probe"] > 0.7, results
    assert results["cooked"] > 0.6, results
