"""Feature-space detectors: independent NumPy references on small inputs, plus properties.

References are written here with plain NumPy / SciPy / scikit-learn, following each paper's
formula, never calling the detectors' helpers.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from sklearn.mixture import GaussianMixture
from sklearn.neighbors import NearestNeighbors

from oodscope.backbones.base import Features
from oodscope.detectors import create, load
from oodscope.detectors.base import DetectorError


# ----------------------------------------------------------------------------- data
def make_data(seed: int = 0, n: int = 120, d: int = 6, c: int = 3) -> tuple[Features, np.ndarray]:
    """A toy classifier: Gaussian classes, a nearest-mean linear head, two pooled layers."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % c
    centres = rng.normal(0, 3, (c, d))
    mix = np.eye(d) + 0.3 * rng.normal(size=(d, d))
    pen = (centres[y] + rng.normal(size=(n, d)) @ mix).astype(np.float64)
    weight = centres.copy()
    bias = -0.5 * (centres**2).sum(1)
    logits = pen @ weight.T + bias
    emb = pen @ rng.normal(size=(d, 4))  # a different space, to see which field is read
    layers = {"block1": pen[:, :3] + rng.normal(size=(n, 3)), "block2": np.tanh(pen)}
    f = Features(embedding=emb, penultimate=pen, logits=logits, weight=weight, bias=bias, layers=layers)
    return f, y


def l2n(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def as_torch_dict(f: Features) -> dict:
    out = {k: torch.from_numpy(np.asarray(getattr(f, k))) for k in ("embedding", "penultimate", "logits")}
    out["weight"] = torch.from_numpy(f.weight)
    out["bias"] = torch.from_numpy(f.bias)
    out["layers"] = {k: torch.from_numpy(v) for k, v in f.layers.items()}
    return out


def np_tied(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    classes = np.unique(y)
    means = np.stack([x[y == c].mean(0) for c in classes])
    centred = np.concatenate([x[y == c] - means[i] for i, c in enumerate(classes)])
    return means, centred.T @ centred / len(x)


def np_min_md(x: np.ndarray, means: np.ndarray, cov: np.ndarray) -> np.ndarray:
    prec = np.linalg.inv(cov)
    return np.array([min((xi - m) @ prec @ (xi - m) for m in means) for xi in x])


# Every detector of this module with small-data settings, for the shared property tests.
METHODS = {
    "mahalanobis": {},
    "relative_mahalanobis": {},
    "multilayer_mahalanobis": {},
    "knn": {"k": 5},
    "vim": {"dim": 3},
    "gmm": {"n_components": 3, "pca_dim": 4},
    "she": {},
    "nnguide": {"k": 5},
    "fdbd": {},
    "nci": {},
}


def fitted(name: str, **extra: object):
    f, y = make_data()
    return create(name, **{**METHODS[name], **extra}).fit(f, y)


# ----------------------------------------------------------------------------- Mahalanobis family
def _hand_data() -> tuple[np.ndarray, np.ndarray]:
    """Two classes of 6 points at +-sqrt(3) e_i around (0,0,0) and (4,0,0): tied covariance = I."""
    a = np.sqrt(3.0)
    star = np.concatenate([a * np.eye(3), -a * np.eye(3)])
    x = np.concatenate([star, star + [4.0, 0.0, 0.0]])
    return x, np.repeat([0, 1], 6)


def test_mahalanobis_hand_checked() -> None:
    x, y = _hand_data()
    det = create("mahalanobis").fit(x, y)
    q = np.array([[1.0, 2.0, 0.0], [4.0, 0.0, 0.0], [2.0, 0.0, 1.0]])
    # Identity covariance: min(||q||^2, ||q - (4,0,0)||^2) = min(5, 13), min(16, 0), min(5, 5).
    np.testing.assert_allclose(det.score(q), [5.0, 0.0, 5.0], atol=1e-12)


def test_relative_mahalanobis_hand_checked() -> None:
    x, y = _hand_data()
    det = create("relative_mahalanobis").fit(x, y)
    # Background Gaussian: mean (2,0,0), covariance diag(1 + 4, 1, 1) (within + between classes).
    q = np.array([[1.0, 2.0, 0.0]])
    np.testing.assert_allclose(det.score(q), [5.0 - (1.0 / 5.0 + 4.0)], atol=1e-12)


def test_mahalanobis_matches_numpy() -> None:
    f, y = make_data(seed=1)
    det = create("mahalanobis").fit(f, y)
    q, _ = make_data(seed=2, n=30)
    means, cov = np_tied(f.penultimate, y)
    np.testing.assert_allclose(det.score(q), np_min_md(q.penultimate, means, cov), rtol=1e-9)
    assert det.fit_info_["feature"] == "penultimate"


def test_relative_mahalanobis_matches_numpy() -> None:
    f, y = make_data(seed=1)
    det = create("relative_mahalanobis").fit(f, y)
    q, _ = make_data(seed=2, n=30)
    x = f.penultimate
    means, cov = np_tied(x, y)
    prec, prec0 = np.linalg.inv(cov), np.linalg.inv(np.cov(x.T, bias=True))
    mu0 = x.mean(0)
    ref = [
        min((z - m) @ prec @ (z - m) - (z - mu0) @ prec0 @ (z - mu0) for m in means) for z in q.penultimate
    ]
    np.testing.assert_allclose(det.score(q), ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["mahalanobis", "relative_mahalanobis"])
def test_mahalanobis_invariant_to_affine_maps(name: str) -> None:
    f, y = make_data(seed=3)
    q, _ = make_data(seed=4, n=25)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6)) + 3 * np.eye(6)
    shift = rng.normal(size=6) * 10
    base = create(name).fit(f.penultimate, y).score(q.penultimate)
    moved = create(name).fit(f.penultimate @ a.T + shift, y).score(q.penultimate @ a.T + shift)
    np.testing.assert_allclose(moved, base, rtol=1e-7, atol=1e-7)


def test_mahalanobis_rank_deficient_uses_pseudo_inverse() -> None:
    f, y = make_data(seed=5)
    x = np.concatenate([f.penultimate, f.penultimate[:, :1]], axis=1)  # duplicated unit: singular
    q, _ = make_data(seed=6, n=10)
    qx = np.concatenate([q.penultimate, q.penultimate[:, :1]], axis=1)
    det = create("mahalanobis").fit(x, y)
    assert det.fit_info_["rank"] == 6
    means, cov = np_tied(x, y)
    prec = np.linalg.pinv(cov, hermitian=True)
    ref = [min((z - m) @ prec @ (z - m) for m in means) for z in qx]
    np.testing.assert_allclose(det.score(qx), ref, rtol=1e-7)


def test_mahalanobis_shrinkage() -> None:
    f, y = make_data(seed=7)
    means, cov = np_tied(f.penultimate, y)
    s = 0.3
    shrunk = (1 - s) * cov + s * np.trace(cov) / 6 * np.eye(6)
    det = create("mahalanobis", shrinkage=s).fit(f, y)
    np.testing.assert_allclose(det.score(f), np_min_md(f.penultimate, means, shrunk), rtol=1e-9)


@pytest.mark.parametrize("name", ["mahalanobis", "relative_mahalanobis"])
def test_gaussian_fit_on_fewer_images_than_dimensions_is_flagged(name: str) -> None:
    from oodscope.detectors.base import FitWarning

    f, y = make_data(seed=8, n=8, d=6)  # 3 classes: the tied covariance has rank <= 8 - 3 < 6
    with pytest.warns(FitWarning, match="fitted on 8 images of 6-d features.*at least 9 images"):
        det = create(name).fit(f, y)
    assert "singular" in det.fit_info_["warnings"][0]
    assert np.linalg.matrix_rank(np_tied(f.penultimate, y)[1]) < 6
    # Enough images for a full-rank estimate, or shrinkage, and there is nothing to flag.
    f7, y7 = make_data(seed=8, n=9, d=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FitWarning)
        assert "warnings" not in create(name).fit(f7, y7).fit_info_
        assert "warnings" not in create(name, shrinkage=0.1).fit(f, y).fit_info_
    # The caution survives save / load.
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        det.save(tmp)
        assert load(tmp).fit_info_["warnings"] == det.fit_info_["warnings"]


def test_multilayer_mahalanobis_matches_numpy() -> None:
    f, y = make_data(seed=8)
    q, _ = make_data(seed=9, n=20)
    weights = [0.25, 2.0]
    det = create("multilayer_mahalanobis", weights=weights).fit(f, y)
    assert det.fit_info_["layers"] == ["block1", "block2"]
    ref = np.zeros(len(q))
    for w, name in zip(weights, ["block1", "block2"], strict=True):
        means, cov = np_tied(f.layers[name], y)
        id_scores = np_min_md(f.layers[name], means, cov)
        ref += w * (np_min_md(q.layers[name], means, cov) - id_scores.mean()) / id_scores.std()
    np.testing.assert_allclose(det.score(q), ref, rtol=1e-8, atol=1e-9)
    # One chosen layer with unit weight: the z-scored Mahalanobis of that layer.
    one = create("multilayer_mahalanobis", layers=["block2"]).fit(f, y)
    single = create("mahalanobis").fit(f.layers["block2"], y)
    id_scores = single.score(f.layers["block2"])
    np.testing.assert_allclose(
        one.score(q), (single.score(q.layers["block2"]) - id_scores.mean()) / id_scores.std(), rtol=1e-8
    )


def test_multilayer_errors() -> None:
    f, y = make_data()
    with pytest.raises(DetectorError, match="missing"):
        create("multilayer_mahalanobis", layers=["block9"]).fit(f, y)
    with pytest.raises(DetectorError, match="weights"):
        create("multilayer_mahalanobis", weights=[1.0]).fit(f, y)
    no_layers = Features(embedding=f.embedding, penultimate=f.penultimate)
    with pytest.raises(DetectorError, match="layers"):
        create("multilayer_mahalanobis").fit(no_layers, y)


# ----------------------------------------------------------------------------- KNN
def test_knn_matches_sklearn_on_normalized_features() -> None:
    f, y = make_data(seed=10, n=200)
    q, _ = make_data(seed=11, n=40)
    det = create("knn", k=7).fit(f)
    ref = NearestNeighbors(n_neighbors=7).fit(l2n(f.penultimate)).kneighbors(l2n(q.penultimate))[0][:, -1]
    np.testing.assert_allclose(det.score(q), ref, rtol=1e-5, atol=1e-6)
    torch_det = create("knn", k=7, index="torch").fit(f)
    np.testing.assert_allclose(torch_det.score(q), ref, rtol=1e-5, atol=1e-6)


def test_knn_scale_invariance_and_monotone_in_k() -> None:
    f, _ = make_data(seed=12, n=150)
    q, _ = make_data(seed=13, n=30)
    det = create("knn", k=5).fit(f)
    rng = np.random.default_rng(0)
    scaled_bank = f.penultimate * rng.uniform(0.1, 10, (len(f), 1))
    scaled_q = q.penultimate * rng.uniform(0.1, 10, (len(q), 1))
    np.testing.assert_allclose(
        create("knn", k=5).fit(scaled_bank).score(scaled_q), det.score(q), rtol=1e-5, atol=1e-6
    )
    larger_k = create("knn", k=20).fit(f).score(q)
    assert np.all(larger_k >= det.score(q) - 1e-7)


def test_knn_subsample_keeps_seeded_fraction() -> None:
    f, _ = make_data(seed=14, n=200)
    det = create("knn", k=3, subsample=0.25, seed=5).fit(f)
    keep = np.sort(np.random.default_rng(5).choice(200, size=50, replace=False))
    np.testing.assert_allclose(det.state_["bank"].numpy(), l2n(f.penultimate[keep]), rtol=1e-6, atol=1e-7)
    q, _ = make_data(seed=15, n=10)
    ref = (
        NearestNeighbors(n_neighbors=3).fit(l2n(f.penultimate[keep])).kneighbors(l2n(q.penultimate))[0][:, -1]
    )
    np.testing.assert_allclose(det.score(q), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(DetectorError, match="bank has only"):
        create("knn", k=60, subsample=0.25).fit(f)


def test_knn_exact_and_approximate_agree() -> None:
    pytest.importorskip("faiss")
    rng = np.random.default_rng(16)
    centres = rng.normal(size=(15, 12))
    bank = centres[rng.integers(0, 15, 3000)] + 0.4 * rng.normal(size=(3000, 12))
    q = np.concatenate([centres[rng.integers(0, 15, 200)] + 0.4 * rng.normal(size=(200, 12))])
    exact = create("knn", k=10).fit(bank).score(q)
    for params in ({"kind": "ivf"}, {"kind": "hnsw", "m": 16}):
        approx = create("knn", k=10, index="approximate", index_params=params).fit(bank).score(q)
        assert np.median(np.abs(approx - exact) / exact) < 0.01
        assert np.corrcoef(approx, exact)[0, 1] > 0.99


def test_knn_saves_normalized_bank_and_rebuilds_index(tmp_path) -> None:
    f, _ = make_data(seed=17, n=80)
    det = create("knn", k=4, subsample=0.5).fit(f)
    det.save(tmp_path)
    back = load(tmp_path)
    assert set(back.state_) == {"bank"}
    np.testing.assert_allclose(np.linalg.norm(back.state_["bank"].numpy(), axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(back.score(f), det.score(f))
    assert back.fit_info_["feature"] == "penultimate"


# ----------------------------------------------------------------------------- ViM
def np_vim(train: Features, test: Features, dim: int, use_bias: bool = True) -> np.ndarray:
    w = train.weight
    b = train.bias if use_bias else np.zeros(len(w))
    u = -np.linalg.pinv(w) @ b
    xc = train.penultimate - u
    vals, vecs = np.linalg.eigh(xc.T @ xc / len(xc))
    ns = vecs[:, np.argsort(-vals)[dim:]]
    alpha = (train.penultimate @ w.T + b).max(1).mean() / np.linalg.norm(xc @ ns, axis=1).mean()
    resid = np.linalg.norm((test.penultimate - u) @ ns, axis=1)
    return alpha * resid - logsumexp(test.penultimate @ w.T + b, axis=1)


def test_vim_matches_numpy() -> None:
    f, _ = make_data(seed=18)
    q, _ = make_data(seed=19, n=30)
    q.weight, q.bias = f.weight, f.bias
    det = create("vim", dim=3).fit(f)
    np.testing.assert_allclose(det.score(q), np_vim(f, q, 3), rtol=1e-8, atol=1e-8)
    assert det.fit_info_["optional"] == ["bias"]


def test_vim_without_bias_and_bias_consistency() -> None:
    f, _ = make_data(seed=20)
    no_bias = Features(embedding=f.embedding, penultimate=f.penultimate, weight=f.weight)
    det = create("vim", dim=2).fit(no_bias)
    np.testing.assert_allclose(det.score(no_bias), np_vim(f, f, 2, use_bias=False), rtol=1e-8, atol=1e-8)
    with_bias = create("vim", dim=2).fit(f)
    with pytest.raises(DetectorError, match="bias"):
        with_bias.score(no_bias)


def test_vim_default_dim_rule_and_residual_sign() -> None:
    from oodscope.detectors.vim import default_dim

    assert (default_dim(2048), default_dim(768), default_dim(512)) == (1000, 512, 256)
    f, _ = make_data(seed=21)
    det = create("vim").fit(f)
    assert det.fit_info_["dim"] == 3  # 6 // 2
    # Pushing a feature along the residual directions raises the score (more OOD).
    residual = det.state_["residual_basis"].numpy()[:, 0]
    pushed = Features(
        embedding=f.embedding, penultimate=f.penultimate + 20 * residual, weight=f.weight, bias=f.bias
    )
    assert np.all(det.score(pushed) > det.score(f))


def test_vim_refuses_a_fit_set_no_larger_than_its_subspace() -> None:
    f, _ = make_data(seed=23, n=12, d=16)
    with pytest.raises(DetectorError, match=r"dim=12.*\(12\).*dim < 12"):
        create("vim", dim=12).fit(f)
    det = create("vim", dim=11).fit(f)  # one residual direction per image beyond the subspace
    assert np.isfinite(det.score(f)).all()


# ----------------------------------------------------------------------------- GMM
@pytest.mark.parametrize("cov_type", ["full", "tied", "diag", "spherical"])
def test_gmm_density_matches_sklearn_and_scipy(cov_type: str) -> None:
    f, _ = make_data(seed=22, n=150)
    q, _ = make_data(seed=23, n=20)
    det = create("gmm", n_components=3, covariance_type=cov_type, pca_dim=None).fit(f)
    z = q.penultimate - f.penultimate.mean(0)  # no PCA: centred coordinates
    means = det.state_["means"].numpy()
    weights = det.state_["weights"].numpy()
    chol = det.state_["precisions_cholesky"].numpy()
    # sklearn object carrying exactly these fitted arrays.
    ref_gm = GaussianMixture(n_components=3, covariance_type=cov_type)
    ref_gm.means_, ref_gm.weights_, ref_gm.precisions_cholesky_ = means, weights, chol
    np.testing.assert_allclose(det.score(q), -ref_gm.score_samples(z), rtol=1e-9)
    # scipy: covariances rebuilt from the precision Cholesky factors.
    d = z.shape[1]
    if cov_type == "full":
        covs = [np.linalg.inv(c @ c.T) for c in chol]
    elif cov_type == "tied":
        covs = [np.linalg.inv(chol @ chol.T)] * 3
    elif cov_type == "diag":
        covs = [np.diag(1.0 / c**2) for c in chol]
    else:
        covs = [np.eye(d) / c**2 for c in chol]
    dens = sum(w * multivariate_normal(m, c).pdf(z) for w, m, c in zip(weights, means, covs, strict=True))
    np.testing.assert_allclose(det.score(q), -np.log(dens), rtol=1e-8)


def test_gmm_fit_equals_sklearn_fit_and_pca_projection() -> None:
    f, _ = make_data(seed=24, n=150)
    det = create("gmm", n_components=2, pca_dim=3, seed=7).fit(f)
    x = f.penultimate - f.penultimate.mean(0)
    vals, vecs = np.linalg.eigh(x.T @ x / len(x))
    top = vecs[:, np.argsort(-vals)[:3]]
    proj = det.state_["projection"].numpy()
    np.testing.assert_allclose(proj @ proj.T, top @ top.T, atol=1e-9)  # same subspace
    z = x @ proj
    ref = GaussianMixture(n_components=2, covariance_type="tied", random_state=7).fit(z)
    np.testing.assert_allclose(det.score(f), -ref.score_samples(z), rtol=1e-7)
    with pytest.raises(DetectorError, match="components"):
        create("gmm", n_components=500).fit(f)


# ----------------------------------------------------------------------------- SHE
def test_she_matches_numpy() -> None:
    f, y = make_data(seed=25)
    f.logits[::7] = f.logits[::7, [1, 2, 0]]  # some ID samples misclassified
    q, _ = make_data(seed=26, n=30)
    pred = f.logits.argmax(1)
    assert 0 < (pred != y).sum() < 20
    patterns = np.stack([f.penultimate[(y == c) & (pred == c)].mean(0) for c in range(3)])
    det = create("she").fit(f, y)
    ref = -(q.penultimate * patterns[q.logits.argmax(1)]).sum(1)
    np.testing.assert_allclose(det.score(q), ref, rtol=1e-10)
    all_patterns = np.stack([f.penultimate[y == c].mean(0) for c in range(3)])
    every = create("she", correct_only=False).fit(f, y)
    np.testing.assert_allclose(every.score(q), -(q.penultimate * all_patterns[q.logits.argmax(1)]).sum(1))


def test_she_fallbacks() -> None:
    f, y = make_data(seed=27)
    logits = f.logits.copy()
    logits[y == 1, 1] = -1e3  # class 1 is never predicted for its own samples
    g = Features(embedding=f.embedding, penultimate=f.penultimate, logits=logits)
    det = create("she").fit(g, y)
    assert det.fit_info_["classes_without_correct_samples"] == [1]
    np.testing.assert_allclose(det.state_["patterns"].numpy()[1], f.penultimate[y == 1].mean(0))
    y2 = np.where(y == 2, 0, y)  # class 2 has no sample at all
    det2 = create("she").fit(f, y2)
    assert det2.fit_info_["classes_without_samples"] == [2]
    scores = det2.score(f)
    unknown = f.logits.argmax(1) == 2
    assert unknown.any() and np.isfinite(scores).all()
    pred = f.logits.argmax(1)
    stored = np.stack([f.penultimate[(y2 == c) & (pred == c)].mean(0) for c in (0, 1)])
    np.testing.assert_allclose(scores[unknown], -(f.penultimate[unknown] @ stored.T).max(1), rtol=1e-10)
    with pytest.raises(DetectorError, match="labels"):
        create("she").fit(f, y + 5)


# ----------------------------------------------------------------------------- NNGuide
def test_nnguide_matches_numpy() -> None:
    f, _ = make_data(seed=28, n=100)
    q, _ = make_data(seed=29, n=25)
    det = create("nnguide", k=6).fit(f)
    bank = l2n(f.penultimate) * logsumexp(f.logits, axis=1)[:, None]
    sims = l2n(q.penultimate) @ bank.T
    guidance = -np.sort(-sims, axis=1)[:, :6].mean(1)
    ref = -(logsumexp(q.logits, axis=1) * guidance)
    np.testing.assert_allclose(det.score(q), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        create("nnguide", k=6, index="torch").fit(f).score(q), ref, rtol=1e-5, atol=1e-5
    )


def test_nnguide_subsample_and_sign() -> None:
    f, _ = make_data(seed=30, n=100)
    f.logits = f.logits - f.logits.min() + 1.0  # positive energies, as for a trained classifier
    det = create("nnguide", k=3, subsample=0.3, seed=1).fit(f)
    assert det.state_["bank"].shape == (30, 6)
    # An input pointing away from every ID feature, with a low energy.
    q = Features(
        embedding=np.zeros((1, 4)),
        penultimate=-f.penultimate.mean(0, keepdims=True),
        logits=np.zeros((1, 3)),
    )
    assert det.score(q)[0] > np.max(det.score(f))


# ----------------------------------------------------------------------------- fDBD
def np_fdbd(train: Features, test: Features, centre: bool = True) -> np.ndarray:
    mu = train.penultimate.mean(0) if centre else np.zeros(train.penultimate.shape[1])
    w = train.weight
    out = []
    for z, lg in zip(test.penultimate, test.logits, strict=True):
        f = int(np.argmax(lg))
        dist = [abs(lg[f] - lg[c]) / np.linalg.norm(w[f] - w[c]) for c in range(len(lg)) if c != f]
        out.append(-np.mean(dist) / np.linalg.norm(z - mu))
    return np.array(out)


def test_fdbd_matches_numpy() -> None:
    f, _ = make_data(seed=31)
    q, _ = make_data(seed=32, n=30)
    q.weight = f.weight
    np.testing.assert_allclose(create("fdbd").fit(f).score(q), np_fdbd(f, q), rtol=1e-10)
    np.testing.assert_allclose(
        create("fdbd", normalizer="norm").fit(f).score(q), np_fdbd(f, q, centre=False), rtol=1e-10
    )


def test_fdbd_boundary_points_score_highest() -> None:
    f, _ = make_data(seed=33)
    det = create("fdbd").fit(f)
    tie = Features(
        embedding=f.embedding[:2], penultimate=f.penultimate[:2], logits=np.ones((2, 3)), weight=f.weight
    )
    assert np.all(det.score(tie) == 0.0)
    assert np.all(det.score(f) < 0.0)


# ----------------------------------------------------------------------------- NCI
def test_nci_matches_numpy() -> None:
    f, _ = make_data(seed=34)
    q, _ = make_data(seed=35, n=30)
    q.weight = f.weight
    mu = f.penultimate.mean(0)
    c = q.penultimate - mu
    w = f.weight[q.logits.argmax(1)]
    for alpha in (1e-4, 0.5):
        ref = -((w * c).sum(1) / np.linalg.norm(c, axis=1) + alpha * np.abs(q.penultimate).sum(1))
        np.testing.assert_allclose(create("nci", alpha=alpha).fit(f).score(q), ref, rtol=1e-10)


def test_nci_sign() -> None:
    f, _ = make_data(seed=36)
    det = create("nci", alpha=0.0).fit(f)
    mu = f.penultimate.mean(0)
    pred = f.logits.argmax(1)
    # Same predictions, but the centred feature turned against its class weight: more OOD.
    flipped = Features(
        embedding=f.embedding, penultimate=mu - 0.1 * f.weight[pred], logits=f.logits, weight=f.weight
    )
    aligned = Features(
        embedding=f.embedding, penultimate=mu + 0.1 * f.weight[pred], logits=f.logits, weight=f.weight
    )
    assert np.all(det.score(flipped) > det.score(aligned))


# ----------------------------------------------------------------------------- shared properties
def test_far_away_points_score_higher() -> None:
    f, y = make_data(seed=37)
    far = Features(
        embedding=f.embedding[:5] * 0 + 50.0,
        penultimate=f.penultimate[:5] * 0 + np.array([60.0, -60, 60, -60, 60, -60]),
        layers={k: v[:5] * 0 + 40.0 for k, v in f.layers.items()},
    )
    for name in ("mahalanobis", "multilayer_mahalanobis", "gmm"):
        det = create(name, **METHODS[name]).fit(f, y)
        assert det.score(far).min() > det.score(f).max(), name
    # KNN only sees directions: take a direction no ID feature comes close to.
    knn = create("knn", k=5).fit(f)
    direction = -l2n(f.penultimate).mean(0)
    assert knn.score(Features(embedding=f.embedding[:1], penultimate=direction[None]))[0] > knn.score(f).max()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_save_load_identical_scores(name: str, tmp_path) -> None:
    f, y = make_data()
    q, _ = make_data(seed=99, n=17)
    q.weight, q.bias = f.weight, f.bias
    det = create(name, **METHODS[name]).fit(f, y)
    det.save(tmp_path, backbone_id="toy")
    back = load(tmp_path, expected_backbone_id="toy")
    assert back.get_params() == det.get_params()
    scores = back.score(q)
    np.testing.assert_array_equal(scores, det.score(q))
    assert scores.dtype == np.float64 and scores.shape == (17,)
    assert np.all(np.isfinite(scores))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_batch_order_chunking_and_torch_input(name: str) -> None:
    f, y = make_data()
    det = create(name, **METHODS[name]).fit(f, y)
    base = det.score(f)
    perm = np.random.default_rng(0).permutation(len(f))
    shuffled = f.subset(perm)
    np.testing.assert_allclose(det.score(shuffled), base[perm], rtol=1e-12, atol=1e-12)
    det.score_batch_size = 7
    np.testing.assert_allclose(det.score(f), base, rtol=1e-12, atol=1e-12)
    del det.score_batch_size
    np.testing.assert_allclose(det.score(as_torch_dict(f)), base, rtol=1e-6, atol=1e-6)
    # Fitting from torch tensors gives the same detector.
    again = create(name, **METHODS[name]).fit(as_torch_dict(f), torch.from_numpy(y))
    np.testing.assert_allclose(again.score(f), base, rtol=1e-6, atol=1e-6)


def test_feature_selection() -> None:
    f, y = make_data()
    auto = create("mahalanobis").fit(f, y)
    assert auto.fit_info_["feature"] == "penultimate"
    emb_only = Features(embedding=f.embedding)
    vlm = create("mahalanobis").fit(emb_only, y)
    assert vlm.fit_info_["feature"] == "embedding"
    means, cov = np_tied(f.embedding, y)
    np.testing.assert_allclose(vlm.score(emb_only), np_min_md(f.embedding, means, cov), rtol=1e-9)
    explicit = create("mahalanobis", feature="embedding").fit(f, y)
    np.testing.assert_allclose(explicit.score(f), vlm.score(emb_only), rtol=1e-12)
    with pytest.raises(DetectorError, match="penultimate"):
        auto.score(emb_only)  # fitted on penultimate: the same field is required
    with pytest.raises(DetectorError, match="feature must be"):
        create("knn", feature="logits")
    with pytest.raises(DetectorError, match="feature must be"):
        create("vim", feature="auto")
    knn_array = create("knn", k=3).fit(f.penultimate)
    np.testing.assert_allclose(knn_array.score(f.penultimate), create("knn", k=3).fit(f).score(f), rtol=1e-6)


def test_missing_fields_labels_and_fit_errors() -> None:
    f, y = make_data()
    for name in ("mahalanobis", "relative_mahalanobis", "multilayer_mahalanobis", "she"):
        with pytest.raises(DetectorError, match="labels"):
            create(name, **METHODS[name]).fit(f)
    emb_only = Features(embedding=f.embedding)
    for name in ("vim", "she", "nnguide", "fdbd", "nci"):
        with pytest.raises(DetectorError, match="needs"):
            create(name, **METHODS[name]).fit(emb_only, y)
    with pytest.raises(DetectorError, match="fit"):
        create("knn").score(f)
    with pytest.raises(DetectorError, match="fitted on 6-d"):
        create("knn", k=3).fit(f).score(np.ones((2, 4)))
    with pytest.raises(DetectorError, match="dim must be"):
        create("vim", dim=6).fit(f)
    with pytest.raises(DetectorError, match="k must be"):
        create("knn", k=0)
    with pytest.raises(DetectorError, match="subsample"):
        create("nnguide", subsample=1.5)
    with pytest.raises(DetectorError, match="covariance_type"):
        create("gmm", covariance_type="banded")
    with pytest.raises(DetectorError, match="normalizer"):
        create("fdbd", normalizer="l1")
