"""Defaults that follow the fit-set size (``docs/fit_size_defaults.md``).

Each rule's expected value is written here from its documented formula (never by calling
``oodscope.detectors._fit_size``), checked against what a fit records in ``fit_info_["auto"]`` at
several fit-set sizes, and against the scores of the same detector given that value explicitly.
Also: an explicit value wins and is not recorded; ``get_params()`` is untouched by fit; at the
leaderboard's size (6,000 images, 1,280-d, 6 classes) every rule gives today's default, with
bit-identical scores; and on real data (scikit-learn's digits) the small-set rules genuinely help.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.covariance import ledoit_wolf_shrinkage
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import roc_auc_score

from oodscope.backbones.base import Features
from oodscope.detectors import create, load
from oodscope.detectors.base import DetectorError, FitWarning


# ----------------------------------------------------------------------------- the documented formulas
def knn_k(n: int) -> int:
    return min(50, max(1, n // 100))


def nnguide_k(n: int) -> int:
    return min(10, max(1, n // 100))


def vim_dim(width: int, n: int) -> int:
    rule = 1000 if width >= 2048 else 512 if width >= 768 else width // 2
    return min(rule, max(1, n // 2))


def gmm_components(n: int) -> int:
    return min(50, max(1, n // 10))


def gmm_pca_dim(n: int, k: int) -> int:
    return min(50, max(1, (n - k) // 2))


def test_documented_values_at_100_1000_6000() -> None:
    # The table of docs/fit_size_defaults.md.
    assert [knn_k(n) for n in (100, 1000, 6000)] == [1, 10, 50]
    assert [nnguide_k(n) for n in (100, 1000, 6000)] == [1, 10, 10]
    assert [vim_dim(1280, n) for n in (100, 1000, 6000)] == [50, 500, 512]
    assert [vim_dim(384, n) for n in (100, 1000, 6000)] == [50, 192, 192]
    assert [vim_dim(2048, n) for n in (100, 1000, 6000)] == [50, 500, 1000]
    assert [gmm_components(n) for n in (100, 1000, 6000)] == [10, 50, 50]
    assert [gmm_pca_dim(n, gmm_components(n)) for n in (100, 1000, 6000)] == [45, 50, 50]


# ----------------------------------------------------------------------------- data
def blobs(n: int, d: int, c: int = 3, seed: int = 0, classes_out: int = 10) -> tuple[Features, np.ndarray]:
    """Gaussian classes with a linear head (``classes_out`` logits) and two pooled layers."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % c
    centres = rng.normal(0, 3, (c, d))
    x = centres[y] + rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0, d)
    weight = rng.normal(size=(classes_out, d)) / np.sqrt(d)
    bias = rng.normal(size=classes_out)
    layers = {"a": x[:, : max(1, d // 2)] + rng.normal(size=(n, max(1, d // 2))), "b": np.tanh(x)}
    f = Features(embedding=x[:, : max(1, d // 2)], penultimate=x, logits=x @ weight.T + bias, weight=weight,
                 bias=bias, layers=layers)
    return f, y


def queries(f: Features, seed: int = 1, rows: int = 25) -> Features:
    rng = np.random.default_rng(seed)
    rows = min(rows, len(f.penultimate))
    x = f.penultimate[:rows] + rng.normal(size=(rows, f.penultimate.shape[1]))
    return Features(embedding=x[:, : f.embedding.shape[1]], penultimate=x, logits=x @ f.weight.T + f.bias,
                    weight=f.weight, bias=f.bias, layers={k: v[:rows] + 0.5 for k, v in f.layers.items()})


# ----------------------------------------------------------------------------- KNN / NNGuide
@pytest.mark.parametrize("n", [3, 99, 100, 250, 1000, 5000, 5100])
def test_knn_k_follows_the_bank_size(n: int) -> None:
    f, _ = blobs(n, 4)
    q = queries(f)
    det = create("knn").fit(f)
    assert det.fit_info_["auto"] == {"k": knn_k(n)}
    assert det.get_params()["k"] is None
    np.testing.assert_array_equal(det.score(q), create("knn", k=knn_k(n)).fit(f).score(q))


def test_knn_k_counts_the_subsampled_bank_and_is_saved(tmp_path) -> None:
    f, _ = blobs(1000, 4)
    det = create("knn", subsample=0.3, seed=2).fit(f)  # 300 rows kept
    assert det.fit_info_["auto"] == {"k": 3}
    det.save(tmp_path)
    back = load(tmp_path)
    assert back.fit_info_["auto"] == {"k": 3} and back.get_params()["k"] is None
    np.testing.assert_array_equal(back.score(f), det.score(f))
    np.testing.assert_array_equal(det.score(f), create("knn", k=3, subsample=0.3, seed=2).fit(f).score(f))


@pytest.mark.parametrize("n", [40, 100, 999, 1000, 3000])
def test_nnguide_k_follows_the_bank_size(n: int) -> None:
    f, _ = blobs(n, 5)
    q = queries(f)
    det = create("nnguide").fit(f)
    assert det.fit_info_["auto"] == {"k": nnguide_k(n)}
    np.testing.assert_array_equal(det.score(q), create("nnguide", k=nnguide_k(n)).fit(f).score(q))


def test_explicit_k_wins_and_is_not_recorded() -> None:
    f, _ = blobs(120, 4)
    for name in ("knn", "nnguide"):
        det = create(name, k=7).fit(f)
        assert "auto" not in det.fit_info_
        assert det.get_params()["k"] == 7
    with pytest.raises(DetectorError, match="bank has only"):  # as before: an explicit k is not lowered
        create("knn", k=50).fit(blobs(30, 4)[0])
    for bad in (0, -1, 2.5, "auto"):
        with pytest.raises(DetectorError, match="k must be"):
            create("knn", k=bad)


# ----------------------------------------------------------------------------- ViM
@pytest.mark.parametrize("n", [4, 9, 17, 40, 200])
def test_vim_dim_stays_below_the_fit_set(n: int) -> None:
    f, _ = blobs(n, 16)
    det = create("vim").fit(f)
    assert det.fit_info_["auto"] == {"dim": vim_dim(16, n)}
    assert det.fit_info_["dim"] == vim_dim(16, n)
    q = queries(f, rows=min(n, 25))
    np.testing.assert_array_equal(det.score(q), create("vim", dim=vim_dim(16, n)).fit(f).score(q))


def test_vim_fits_120_images_of_1280d_features() -> None:
    # The README's low-level example on a 120-image folder: dim=None used to mean 512 and fail.
    rng = np.random.default_rng(3)
    n, d = 120, 1280
    basis = rng.normal(size=(40, d))
    x = np.abs(rng.normal(size=(n, 40)) @ basis + 0.3 * rng.normal(size=(n, d)))  # ReLU-like, low rank
    weight, bias = rng.normal(size=(10, d)) / np.sqrt(d), rng.normal(size=10)
    f = Features(embedding=x[:, :8], penultimate=x, weight=weight, bias=bias)
    det = create("vim").fit(f)
    assert det.fit_info_["auto"] == {"dim": 60} and det.fit_info_["dim"] == 60
    assert det.get_params() == {"dim": None, "feature": "penultimate"}
    scores = det.score(f)
    assert np.isfinite(scores).all() and np.isfinite(det.fit_info_["alpha"])
    # Off the ID subspace along the residual directions: more OOD.
    far = Features(embedding=x[:, :8], penultimate=x + 5 * rng.normal(size=(n, d)), weight=weight, bias=bias)
    assert np.median(det.score(far)) > np.max(scores)
    with pytest.raises(DetectorError, match=r"dim=512.*\(120\)"):  # an explicit dim still wins (and fails)
        create("vim", dim=512).fit(f)


# ----------------------------------------------------------------------------- GMM
@pytest.mark.parametrize("n", [12, 30, 100, 600])
def test_gmm_components_and_pca_dim_follow_the_fit_set(n: int) -> None:
    f, _ = blobs(n, 64)
    k = gmm_components(n)
    det = create("gmm").fit(f)
    assert det.fit_info_["auto"] == {"n_components": k, "pca_dim": gmm_pca_dim(n, k)}
    assert det.state_["projection"].shape == (64, gmm_pca_dim(n, k))
    assert det.get_params()["n_components"] is None and det.get_params()["pca_dim"] == "auto"
    q = queries(f)
    explicit = create("gmm", n_components=k, pca_dim=gmm_pca_dim(n, k)).fit(f)
    np.testing.assert_array_equal(det.score(q), explicit.score(q))


def test_gmm_explicit_values_win() -> None:
    f, _ = blobs(100, 64)
    det = create("gmm", n_components=3).fit(f)
    assert det.fit_info_["auto"] == {"pca_dim": gmm_pca_dim(100, 3)}  # the other one still follows n
    det = create("gmm", n_components=3, pca_dim=None).fit(f)
    assert "auto" not in det.fit_info_ and det.state_["projection"].shape == (64, 64)  # None: no PCA, as before
    det = create("gmm", pca_dim=7).fit(f)
    assert det.fit_info_["auto"] == {"n_components": 10} and det.state_["projection"].shape == (64, 7)
    with pytest.raises(DetectorError, match="components"):
        create("gmm", n_components=500).fit(f)
    with pytest.raises(DetectorError, match="pca_dim"):
        create("gmm", pca_dim="all")
    with pytest.raises(DetectorError, match="n_components"):
        create("gmm", n_components=0)


# ----------------------------------------------------------------------------- Mahalanobis family
def np_tied(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    classes = np.unique(y)
    means = np.stack([x[y == c].mean(0) for c in classes])
    dev = x - means[np.searchsorted(classes, y)]
    return means, dev.T @ dev / len(x), dev


def shrunk(cov: np.ndarray, s: float) -> np.ndarray:
    return (1 - s) * cov + s * np.trace(cov) / len(cov) * np.eye(len(cov))


def np_min_md(q: np.ndarray, means: np.ndarray, cov: np.ndarray) -> np.ndarray:
    prec = np.linalg.inv(cov)
    return np.array([min((z - m) @ prec @ (z - m) for m in means) for z in q])


@pytest.mark.parametrize("name", ["mahalanobis", "relative_mahalanobis"])
def test_no_shrinkage_while_the_covariance_can_be_full_rank(name: str) -> None:
    f, y = blobs(9, 6)  # 9 images - 3 classes = 6 = d: full rank possible
    q = queries(f, rows=9)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FitWarning)
        det = create(name).fit(f, y)
    expected = {"shrinkage": 0.0} if name == "mahalanobis" else {"shrinkage": 0.0, "background_shrinkage": 0.0}
    assert det.fit_info_["auto"] == expected and "warnings" not in det.fit_info_
    np.testing.assert_array_equal(det.score(q), create(name, shrinkage=0.0).fit(f, y).score(q))


def test_mahalanobis_shrinks_by_ledoit_wolf_when_singular() -> None:
    f, y = blobs(8, 6)  # rank <= 8 - 3 < 6
    q = queries(f, rows=8)
    with pytest.warns(FitWarning, match=r"fitted on 8 images of 6-d features.*singular.*automatic Ledoit-Wolf"):
        det = create("mahalanobis").fit(f, y)
    means, cov, dev = np_tied(f.penultimate, y)
    s = ledoit_wolf_shrinkage(dev, assume_centered=True)
    assert 0 < s < 1
    assert det.fit_info_["auto"]["shrinkage"] == pytest.approx(s, rel=1e-10)
    assert det.fit_info_["rank"] == 6  # full rank after shrinkage
    np.testing.assert_allclose(det.score(q), np_min_md(q.penultimate, means, shrunk(cov, s)), rtol=1e-8)
    assert det.get_params()["shrinkage"] is None


def test_relative_mahalanobis_shrinks_each_singular_covariance() -> None:
    f, y = blobs(8, 6)  # tied: rank <= 5; background: rank <= 7 >= 6, so only the tied one is shrunk
    x, q = f.penultimate, queries(f, rows=8).penultimate
    with pytest.warns(FitWarning, match="automatic Ledoit-Wolf"):
        det = create("relative_mahalanobis").fit(x, y)
    means, cov, dev = np_tied(x, y)
    s = ledoit_wolf_shrinkage(dev, assume_centered=True)
    assert det.fit_info_["auto"] == {"shrinkage": pytest.approx(s, rel=1e-10), "background_shrinkage": 0.0}
    background = np.cov(x.T, bias=True)
    ref = np_min_md(q, means, shrunk(cov, s)) - np_min_md(q, x.mean(0, keepdims=True), background)
    np.testing.assert_allclose(det.score(q), ref, rtol=1e-7, atol=1e-7)
    # Fewer images than dimensions: the background covariance is shrunk too, by its own intensity.
    f5, y5 = blobs(5, 6)
    with pytest.warns(FitWarning, match="automatic Ledoit-Wolf"):
        det = create("relative_mahalanobis").fit(f5.penultimate, y5)
    s0 = ledoit_wolf_shrinkage(f5.penultimate)  # centred on the mean, as the background Gaussian
    assert det.fit_info_["auto"]["background_shrinkage"] == pytest.approx(s0, rel=1e-10) and s0 > 0


def test_multilayer_mahalanobis_shrinks_layer_by_layer() -> None:
    f, y = blobs(8, 6)  # layer "a" is 3-d (8 - 3 >= 3: not shrunk), layer "b" 6-d (shrunk)
    with pytest.warns(FitWarning, match="layer 'b'.*automatic Ledoit-Wolf"):
        det = create("multilayer_mahalanobis").fit(f, y)
    _, _, dev_b = np_tied(f.layers["b"], y)
    auto = det.fit_info_["auto"]["shrinkage"]
    assert auto["a"] == 0.0 and auto["b"] == pytest.approx(ledoit_wolf_shrinkage(dev_b, assume_centered=True))
    explicit = create("multilayer_mahalanobis", shrinkage=0.2).fit(f, y)
    assert "auto" not in explicit.fit_info_ and "warnings" not in explicit.fit_info_


@pytest.mark.parametrize("name", ["mahalanobis", "relative_mahalanobis", "multilayer_mahalanobis"])
def test_explicit_zero_shrinkage_behaves_as_before(name: str) -> None:
    f, y = blobs(8, 6)
    with pytest.warns(FitWarning, match="covariance is singular, so directions unseen at fit time are ignored"):
        det = create(name, shrinkage=0.0).fit(f, y)
    assert "auto" not in det.fit_info_
    assert det.get_params()["shrinkage"] == 0.0
    with pytest.raises(DetectorError, match="shrinkage"):
        create(name, shrinkage=1.5)


def test_ledoit_wolf_helper_matches_sklearn() -> None:
    import torch

    from oodscope.detectors import _gaussian as g

    rng = np.random.default_rng(5)
    for n, d in ((5, 40), (60, 40), (300, 7)):
        x = rng.normal(size=(n, d)) * rng.uniform(0.2, 3, d) + rng.normal(size=d)
        t = torch.from_numpy(x)
        centre = g.mean(t)
        cov = g.covariance(t, centre)
        got = g.ledoit_wolf_shrinkage(cov, float((((x - x.mean(0)) ** 2).sum(1) ** 2).sum()), n)
        assert got == pytest.approx(ledoit_wolf_shrinkage(x), rel=1e-9, abs=1e-12)
        expected = ledoit_wolf_shrinkage(x) if n - 1 < d else 0.0
        assert g.auto_shrinkage(t, cov, centre) == pytest.approx(expected, rel=1e-9, abs=1e-12)


# ----------------------------------------------------------------------------- parameters untouched
@pytest.mark.parametrize(
    "name", ["knn", "nnguide", "vim", "gmm", "mahalanobis", "relative_mahalanobis", "multilayer_mahalanobis"]
)
def test_get_params_unchanged_by_fit_and_auto_values_saved(name: str, tmp_path) -> None:
    f, y = blobs(60, 8)
    det = create(name)
    before = det.get_params()
    assert {k: before[k] for k in before if k in ("k", "dim", "n_components", "pca_dim", "shrinkage")} in (
        {"k": None}, {"dim": None}, {"n_components": None, "pca_dim": "auto"}, {"shrinkage": None}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitWarning)
        det.fit(f, y)
    assert det.get_params() == before
    assert isinstance(det.fit_info_["auto"], dict) and det.fit_info_["auto"]
    det.save(tmp_path)
    back = load(tmp_path)
    assert back.get_params() == before and back.fit_info_["auto"] == det.fit_info_["auto"]
    q = queries(f)
    np.testing.assert_array_equal(back.score(q), det.score(q))


# ----------------------------------------------------------------------------- the leaderboard's size
def test_at_the_leaderboard_size_every_rule_gives_todays_default() -> None:
    """6,000 fit images, 1,280-d penultimate features, 6 classes: today's defaults (bit-identical scores)."""
    rng = np.random.default_rng(0)
    n, d, c = 6000, 1280, 6
    y = np.arange(n) % c
    x = (rng.normal(size=(c, d))[y] + rng.normal(size=(n, d))).astype(np.float32)
    weight = (0.05 * rng.normal(size=(10, d))).astype(np.float32)
    bias = rng.normal(size=10).astype(np.float32)
    f = Features(penultimate=x, embedding=x[:, :384], logits=x @ weight.T + bias, weight=weight, bias=bias)
    qx = x[:200] + 0.5
    q = Features(penultimate=qx, embedding=qx[:, :384], logits=qx @ weight.T + bias, weight=weight, bias=bias)
    today = {
        "knn": {"k": 50},
        "nnguide": {"k": 10},
        "vim": {"dim": 512},
        "mahalanobis": {"shrinkage": 0.0},
        "relative_mahalanobis": {"shrinkage": 0.0, "background_shrinkage": 0.0},
        "gmm": {"n_components": 50, "pca_dim": 50},
    }
    for name, recorded in today.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error", FitWarning)
            warnings.simplefilter("ignore", ConvergenceWarning)
            # GMM: EM cut to 2 iterations, only the chosen sizes are looked at (its 6,000 x 1,280 fit takes 5 s).
            auto = create(name, **({"max_iter": 2} if name == "gmm" else {})).fit(f, y)
        assert auto.fit_info_["auto"] == recorded, name
        if name in ("vim", "gmm"):  # the recorded value is the one used: checked at small sizes above
            continue
        explicit = {"relative_mahalanobis": {"shrinkage": 0.0}}.get(name, recorded)
        np.testing.assert_array_equal(auto.score(q), create(name, **explicit).fit(f, y).score(q), err_msg=name)
    # The 384-d ConSE embeddings: the same values (ViM's width rule gives 192 there, as before).
    emb = Features(embedding=x[:, :384], penultimate=x[:, :384], weight=weight[:, :384], bias=bias)
    assert create("vim").fit(emb).fit_info_["auto"] == {"dim": 192}
    assert create("mahalanobis", feature="embedding").fit(f, y).fit_info_["auto"] == {"shrinkage": 0.0}


# ----------------------------------------------------------------------------- real data: digits
def _digits_split(per_class: int, seed: int = 0):
    from sklearn.datasets import load_digits, load_sample_images

    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    rng = np.random.default_rng(seed)
    fit = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per_class] for c in range(5)])
    rest = np.setdiff1d(np.flatnonzero(y < 5), fit)
    photos = [im.mean(axis=2) / 255.0 for im in load_sample_images().images]
    patches = []
    for _ in range(300):  # far-OOD: 8x8 grey patches of scikit-learn's two sample photos
        im = photos[rng.integers(2)]
        r, col = rng.integers(0, im.shape[0] - 64), rng.integers(0, im.shape[1] - 64)
        patches.append(im[r : r + 64, col : col + 64].reshape(8, 8, 8, 8).mean(axis=(1, 3)).ravel())
    return x[fit], y[fit], x[rest], np.array(patches)


def _auroc(det, id_x: np.ndarray, ood_x: np.ndarray) -> float:
    s_id, s_ood = det.score(id_x), det.score(ood_x)
    return roc_auc_score(np.r_[np.zeros(len(s_id)), np.ones(len(s_ood))], np.r_[s_id, s_ood])


def test_knn_auto_k_beats_k50_on_100_digit_images() -> None:
    fit_x, _, id_x, far = _digits_split(per_class=20)  # 100 fit images of digits 0-4, 64-d
    auto = create("knn").fit(fit_x)
    assert auto.fit_info_["auto"] == {"k": 1}
    auroc_auto, auroc_50 = _auroc(auto, id_x, far), _auroc(create("knn", k=50).fit(fit_x), id_x, far)
    assert auroc_auto > 0.99 and auroc_auto > auroc_50 + 0.03, (auroc_auto, auroc_50)


def test_mahalanobis_auto_shrinkage_beats_none_on_40_digit_images() -> None:
    fit_x, fit_y, id_x, far = _digits_split(per_class=8)  # 40 fit images, 5 classes, 64-d: singular
    with pytest.warns(FitWarning):
        auto = create("mahalanobis").fit(fit_x, fit_y)
        plain = create("mahalanobis", shrinkage=0.0).fit(fit_x, fit_y)
    assert 0 < auto.fit_info_["auto"]["shrinkage"] < 1
    assert _auroc(auto, id_x, far) > _auroc(plain, id_x, far) + 0.03
