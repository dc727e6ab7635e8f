"""Gaussian AD, PaDiM and PatchCore against independent computations on tiny inputs.

References are written from the papers / official code with numpy loops, scipy and scikit-learn
(``LedoitWolf``, ``np.cov``, ``scipy.spatial.distance.mahalanobis``), never with oodscope's code;
PatchCore's coreset is checked against a brute-force greedy k-center and a brute-force optimal
k-center, and its memory with tracemalloc.
"""

from __future__ import annotations

import itertools
import math
import tracemalloc

import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis
from sklearn.covariance import LedoitWolf

from oodscope.backbones.base import Features
from oodscope.detectors import DetectorError, create, load
from oodscope.detectors._coreset import StreamingGreedyCoreset, sparse_random_projection
from oodscope.detectors._neighbors import NeighborIndex, faiss_module
from oodscope.detectors.padim import default_n_features
from oodscope.detectors.patchcore import locally_aware_features, reweighted_scores


def dense_features(n: int, seed: int, shift: float = 0.0) -> Features:
    """Two random dense layers: 'a' (6 channels, 4 x 4 grid) and 'b' (5 channels, 2 x 2 grid)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, 6, 4, 4)) + np.linspace(0, 1, 6)[None, :, None, None]
    b = 0.5 * rng.standard_normal((n, 5, 2, 2)) + shift
    a[:, :, 1, 2] += shift
    return Features(embedding=np.zeros((n, 2), np.float32),
                    dense={"a": a.astype(np.float32), "b": b.astype(np.float32)})


# --------------------------------------------------------------------------- numpy references
def nearest_up(m: np.ndarray, h: int, w: int) -> np.ndarray:
    """(N, C, h0, w0) -> (N, C, h, w) by repeating each cell (integer ratio)."""
    return m.repeat(h // m.shape[2], axis=2).repeat(w // m.shape[3], axis=3)


def bilinear_up(m: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear, half-pixel centres (align_corners=False), edge clamped — written out per output cell."""
    n, c, h0, w0 = m.shape
    out = np.zeros((n, c, h, w))

    def taps(dst: int, size_in: int, size_out: int) -> tuple[int, int, float]:
        src = max((dst + 0.5) * size_in / size_out - 0.5, 0.0)
        i0 = int(math.floor(src))
        i1 = min(i0 + 1, size_in - 1)
        return i0, i1, src - i0

    for y in range(h):
        y0, y1, ly = taps(y, h0, h)
        for x in range(w):
            x0, x1, lx = taps(x, w0, w)
            out[:, :, y, x] = ((1 - ly) * (1 - lx) * m[:, :, y0, x0] + (1 - ly) * lx * m[:, :, y0, x1]
                               + ly * (1 - lx) * m[:, :, y1, x0] + ly * lx * m[:, :, y1, x1])
    return out


def box3(m: np.ndarray) -> np.ndarray:
    """3 x 3 mean with zero padding counted (sum of the 9 cells / 9)."""
    p = np.pad(m, ((0, 0), (0, 0), (1, 1), (1, 1)))
    h, w = m.shape[2:]
    return sum(p[:, :, dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)) / 9.0


def adaptive_mean(v: np.ndarray, out: int) -> np.ndarray:
    """Adaptive average pooling of the last axis: bin i averages [floor(i L / T), ceil((i + 1) L / T))."""
    length = v.shape[-1]
    return np.stack([v[..., (i * length) // out : -((-(i + 1) * length) // out)].mean(axis=-1) for i in range(out)],
                    axis=-1)


def patch_features(f: Features, target: int | None = None) -> np.ndarray:
    """PatchCore's locally aware features (N, H*W, D), layers sorted by name, 'a' is the finer."""
    a, b = (f.dense[k].astype(np.float64) for k in ("a", "b"))
    x = np.concatenate([box3(a), bilinear_up(box3(b), 4, 4)], axis=1)  # (N, D, 4, 4)
    x = x.reshape(len(x), x.shape[1], -1).transpose(0, 2, 1)
    return adaptive_mean(x, target) if target is not None and x.shape[-1] > target else x


def greedy_kcenter(points: np.ndarray, m: int, start: int) -> list[int]:
    """Brute-force greedy k-center (Gonzalez): explicit differences, float64, ties to the lowest index."""
    picks = [start]
    mind = np.sqrt(((points - points[start]) ** 2).sum(axis=1))
    while len(picks) < m:
        j = int(np.argmax(mind))
        picks.append(j)
        mind = np.minimum(mind, np.sqrt(((points - points[j]) ** 2).sum(axis=1)))
    return picks


def covering_radius(points: np.ndarray, centres: np.ndarray) -> float:
    return float(np.sqrt(((points[:, None] - centres[None]) ** 2).sum(axis=2)).min(axis=1).max())


# --------------------------------------------------------------------------- Gaussian AD
def test_gaussian_ad_matches_sklearn_ledoit_wolf():
    train, test = dense_features(40, 0), dense_features(7, 1, shift=1.5)
    det = create("gaussian_ad").fit(train)
    want = np.zeros(len(test))
    for layer in ("a", "b"):
        lw = LedoitWolf().fit(train.dense[layer].astype(np.float64).mean(axis=(2, 3)))
        want += np.sqrt(lw.mahalanobis(test.dense[layer].astype(np.float64).mean(axis=(2, 3))))
        assert det.fit_info_["shrinkage"][layer] == pytest.approx(lw.shrinkage_, rel=1e-9)
    scores, maps = det.score_maps(test)
    np.testing.assert_allclose(scores, want, rtol=1e-6)
    np.testing.assert_allclose(det.score(test), want, rtol=1e-6)
    assert maps.shape == (7, 1, 1) and type(det).pixel_maps is False  # one cell: the image score, not a map
    np.testing.assert_allclose(maps[:, 0, 0], want, rtol=1e-5)


def test_gaussian_ad_fixed_shrinkage_and_one_layer():
    train, test = dense_features(30, 2), dense_features(5, 3)
    s = 0.3
    x = train.dense["b"].astype(np.float64).mean(axis=(2, 3))
    mu = x.mean(axis=0)
    cov = np.cov(x, rowvar=False, bias=True)
    cov = (1 - s) * cov + s * np.trace(cov) / len(cov) * np.eye(len(cov))
    prec = np.linalg.inv(cov)
    q = test.dense["b"].astype(np.float64).mean(axis=(2, 3))
    want = [scipy_mahalanobis(v, mu, prec) for v in q]
    got = create("gaussian_ad", layers=["b"], shrinkage=s).fit(train).score(test)
    np.testing.assert_allclose(got, want, rtol=1e-6)


# --------------------------------------------------------------------------- PaDiM
def padim_reference(train: Features, test: Features, channels: np.ndarray, eps: float = 0.01) -> np.ndarray:
    """Per grid cell: np.cov + eps I, inverse, scipy's Mahalanobis distance — loops over cells."""
    def embed(f: Features) -> np.ndarray:
        x = np.concatenate([f.dense["a"], nearest_up(f.dense["b"], 4, 4)], axis=1).astype(np.float64)
        return x[:, channels]

    tr, te = embed(train), embed(test)
    maps = np.zeros((len(te), 4, 4))
    for i in range(4):
        for j in range(4):
            cell = tr[:, :, i, j]
            prec = np.linalg.inv(np.cov(cell, rowvar=False) + eps * np.eye(cell.shape[1]))
            mu = cell.mean(axis=0)
            for k in range(len(te)):
                maps[k, i, j] = scipy_mahalanobis(te[k, :, i, j], mu, prec)
    return maps


def test_padim_matches_per_position_loops():
    train, test = dense_features(25, 4), dense_features(6, 5, shift=2.0)
    det = create("padim", n_features=11).fit(train)  # all 11 channels: the selection is the identity
    np.testing.assert_array_equal(det.state_["channels"].numpy(), np.arange(11))
    scores, maps = det.score_maps(test)
    want = padim_reference(train, test, np.arange(11))
    np.testing.assert_allclose(maps, want, rtol=1e-4)
    np.testing.assert_allclose(scores, want.reshape(len(want), -1).max(axis=1), rtol=1e-4)


def test_padim_map_localises_a_defect_cell():
    train, test = dense_features(25, 4), dense_features(6, 5)
    test.dense["a"][:, :, 1, 2] += 4.0  # one defective cell of the finer layer
    maps = create("padim").fit(train).score_maps(test)[1]
    assert (maps.reshape(6, -1).argmax(axis=1) == 1 * 4 + 2).all()


def test_padim_random_channels_are_seeded_and_used():
    train, test = dense_features(25, 6), dense_features(4, 7)
    det = create("padim", n_features=5, seed=3).fit(train)
    channels = det.state_["channels"].numpy()
    assert len(set(channels)) == 5 and channels.max() < 11
    np.testing.assert_array_equal(create("padim", n_features=5, seed=3).fit(train).state_["channels"], channels)
    others = {tuple(create("padim", n_features=5, seed=s).fit(train).state_["channels"].tolist()) for s in range(4)}
    assert len(others) > 1
    np.testing.assert_allclose(det.score_maps(test)[1], padim_reference(train, test, channels), rtol=1e-4)


def test_padim_default_channels_follow_the_paper_widths():
    assert default_n_features(448) == 100  # ResNet18 layers 1-3
    assert default_n_features(1792) == 550  # WideResNet-50 layers 1-3
    assert default_n_features(60) == 60 and default_n_features(176) == 100


# --------------------------------------------------------------------------- PatchCore features
def test_locally_aware_features_match_numpy():
    f = dense_features(3, 8)
    dense = {k: torch.from_numpy(v) for k, v in sorted(f.dense.items())}
    got = locally_aware_features(dense, None).numpy().reshape(3, 16, -1)
    np.testing.assert_allclose(got, patch_features(f), rtol=1e-5, atol=1e-6)
    pooled = locally_aware_features(dense, 4).numpy().reshape(3, 16, -1)
    np.testing.assert_allclose(pooled, patch_features(f, 4), rtol=1e-5, atol=1e-6)


def test_sparse_random_projection_density_and_norms():
    p = sparse_random_projection(400, 64, seed=0)
    assert p.shape == (400, 64)
    assert abs((p != 0).mean() - 1 / 20) < 0.01  # density 1 / sqrt(400)
    np.testing.assert_allclose(np.abs(p[p != 0]), math.sqrt(20 / 64), rtol=1e-6)
    assert abs((p > 0).sum() - (p < 0).sum()) < 0.1 * (p != 0).sum()
    x = np.random.default_rng(1).standard_normal((500, 400)).astype(np.float32)
    ratio = (np.linalg.norm(x @ p, axis=1) / np.linalg.norm(x, axis=1)) ** 2
    assert abs(ratio.mean() - 1) < 0.05  # squared norms preserved in expectation (JL)
    np.testing.assert_array_equal(sparse_random_projection(400, 64, seed=0), p)


# --------------------------------------------------------------------------- the coreset
def _first_pick(seed: int, n: int) -> int:
    return int(np.random.default_rng(seed).integers(n))


@pytest.mark.parametrize("projected", [False, True])
def test_one_chunk_is_the_exact_greedy(projected):
    x = np.random.default_rng(9).standard_normal((300, 24)).astype(np.float32)
    proj = sparse_random_projection(24, 8, seed=2) if projected else None
    sel = StreamingGreedyCoreset(len(x), 0.1, proj, seed=5)
    sel.add(x)
    points = x.astype(np.float64) @ proj.astype(np.float64) if projected else x.astype(np.float64)
    want = greedy_kcenter(points, 30, _first_pick(5, 300))
    assert sel.indices == want
    np.testing.assert_array_equal(sel.bank(), x[want])
    cert = sel.certificate()
    radius = covering_radius(points, points[want])
    assert cert.radius_upper == pytest.approx(radius, rel=1e-4)
    assert cert.ratio <= 2.0 + 1e-6  # Gonzalez: one chunk is the exact greedy's 2-approximation


def test_patchcore_exact_bank_is_the_brute_force_greedy_selection():
    train = dense_features(12, 10)
    det = create("patchcore", coreset="exact", coreset_ratio=0.25, projection_dim=4, seed=1).fit(train)
    feats = patch_features(train).reshape(-1, 11)
    proj = sparse_random_projection(11, 4, seed=1).astype(np.float64)
    want = greedy_kcenter(feats @ proj, int(0.25 * len(feats)), _first_pick(1, len(feats)))
    np.testing.assert_allclose(det.state_["bank"].numpy(), feats[want], rtol=1e-5, atol=1e-6)


def test_streaming_certificate_bounds_the_brute_force_optimum():
    """R (true covering radius) <= radius_upper and the lower bound <= r* (brute-force optimal k-center)."""
    rng = np.random.default_rng(11)
    for trial in range(20):
        x = rng.standard_normal((16, 2)).astype(np.float32) * rng.uniform(0.5, 2.0, size=2).astype(np.float32)
        sel = StreamingGreedyCoreset(16, 0.25, None, seed=trial)
        for chunk in np.array_split(x, 3):
            sel.add(chunk)
        bank = sel.bank()
        assert len(bank) == 4 and len(set(sel.indices)) == 4
        pts = x.astype(np.float64)
        radius = covering_radius(pts, bank.astype(np.float64))
        optimum = min(covering_radius(pts, pts[list(c)]) for c in itertools.combinations(range(16), 4))
        cert = sel.certificate()
        assert radius <= cert.radius_upper + 1e-5
        assert cert.lower_bound <= optimum + 1e-5  # r* over centres anywhere <= the discrete optimum
        assert radius <= cert.ratio * optimum + 1e-5


def test_streaming_stays_close_to_the_exact_greedy():
    x = np.random.default_rng(12).standard_normal((4000, 16)).astype(np.float32)
    exact = StreamingGreedyCoreset(len(x), 0.05, None, seed=0)
    exact.add(x)
    stream = StreamingGreedyCoreset(len(x), 0.05, None, seed=0)
    for chunk in np.array_split(x, 8):
        stream.add(chunk)
    assert len(stream.bank()) == len(exact.bank()) == 200
    pts = x.astype(np.float64)
    r_exact = covering_radius(pts, exact.bank().astype(np.float64))
    r_stream = covering_radius(pts, stream.bank().astype(np.float64))
    assert r_stream <= 1.25 * r_exact
    assert stream.certificate().ratio < 3.0


def _peak_of_streaming(n: int, d: int, chunk: int) -> tuple[int, int]:
    """Peak traced bytes of a streaming selection fed by a generator (the data never exist all at once)."""
    proj = sparse_random_projection(d, 16, seed=0)
    tracemalloc.start()
    sel = StreamingGreedyCoreset(n, 0.02, proj, seed=0)
    rng = np.random.default_rng(0)
    for start in range(0, n, chunk):
        sel.add(rng.standard_normal((min(chunk, n - start), d), dtype=np.float32))
    bank_bytes = sel.bank().nbytes
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, bank_bytes


def test_streaming_memory_is_bounded_by_the_bank_not_the_patches():
    d, chunk = 96, 4096
    peak1, bank1 = _peak_of_streaming(30_000, d, chunk)
    peak2, bank2 = _peak_of_streaming(90_000, d, chunk)
    full2 = 90_000 * d * 4
    chunk_bytes = chunk * d * 4
    assert peak2 < full2 / 4
    # The bank (full features + 16-d projections) is allocated once at its final size; besides it,
    # a few chunk-sized temporaries and one distance block of 2**20 float32.
    with_projection = (d + 16) / d
    assert peak2 <= 1.25 * with_projection * bank2 + 3 * chunk_bytes + 4 * (1 << 20)
    # Tripling the patches grows the peak by the growth of the bank, not of the data (3x 11 MiB).
    assert peak2 - peak1 <= 1.5 * with_projection * (bank2 - bank1) + (1 << 16), (peak1, peak2, bank1, bank2)


# --------------------------------------------------------------------------- PatchCore scores
def _min_distances(queries: np.ndarray, bank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = np.sqrt(((queries[:, None, :] - bank[None, :, :]) ** 2).sum(axis=2))
    return d.min(axis=1), d.argmin(axis=1)


@pytest.mark.parametrize("index", ["torch", "exact"])
def test_patchcore_maps_and_reweighted_scores_vs_brute_force(index):
    if index == "exact" and faiss_module() is None:
        pytest.skip("faiss is not installed (the exact index is then the torch search)")
    train, test = dense_features(10, 13), dense_features(4, 14, shift=1.0)
    det = create("patchcore", coreset_ratio=0.5, index=index, chunk_patches=48).fit(train)
    bank = det.state_["bank"].numpy().astype(np.float64)
    feats = patch_features(test)
    scores, maps = det.score_maps(test)
    want_scores = []
    for i in range(len(feats)):
        dist, nn = _min_distances(feats[i], bank)
        np.testing.assert_allclose(maps[i].ravel(), dist, rtol=1e-4, atol=1e-5)
        star = int(np.argmax(dist))
        m_star = bank[nn[star]]
        support = np.argsort(np.sqrt(((bank - m_star) ** 2).sum(axis=1)), kind="stable")[:9]
        d_sup = np.sqrt(((bank[support] - feats[i, star]) ** 2).sum(axis=1))
        weight = 1.0 - np.exp(d_sup[0]) / np.exp(d_sup).sum()
        want_scores.append(weight * dist[star])
    np.testing.assert_allclose(scores, want_scores, rtol=1e-4)
    plain = create("patchcore", coreset_ratio=0.5, index=index, num_neighbors=1, chunk_patches=48).fit(train)
    np.testing.assert_allclose(plain.score(test), maps.reshape(4, -1).max(axis=1), rtol=1e-5)


def test_reweighting_by_hand():
    # 1-D bank {0, 1, 3}; a test patch at 5 is 2 from its nearest bank point m* = 3, whose 3 nearest
    # bank points are 3, 1, 0 (at 2, 4 and 5 from the patch): w = 1 - e^2 / (e^2 + e^4 + e^5).
    bank = torch.tensor([[0.0], [1.0], [3.0]])
    search = NeighborIndex(bank, "l2", "torch")
    patches = torch.tensor([[[5.0], [3.5]]])  # one image, two patches: the first is the most anomalous
    dist, idx = search.search(patches[0], 1)
    got = reweighted_scores(dist[:, 0].sqrt()[None], idx[:, 0][None], patches, bank, search, 3)
    want = (1 - math.exp(2) / (math.exp(2) + math.exp(4) + math.exp(5))) * 2.0
    assert float(got[0]) == pytest.approx(want, rel=1e-6)


def test_full_bank_is_every_patch_and_normal_patches_score_zero():
    train = dense_features(5, 15)
    det = create("patchcore", coreset_ratio=1.0).fit(train)
    np.testing.assert_allclose(det.state_["bank"].numpy(), patch_features(train).reshape(-1, 11), rtol=1e-5,
                               atol=1e-6)
    _, maps = det.score_maps(train.subset([2]))
    assert np.abs(maps).max() < 1e-3  # a training image's patches are in the bank


# --------------------------------------------------------------------------- shared behaviour
@pytest.mark.parametrize("name", ["gaussian_ad", "padim", "patchcore"])
def test_save_load_and_anomalies_score_higher(name, tmp_path):
    train, normal, odd = dense_features(30, 16), dense_features(6, 17), dense_features(6, 18, shift=3.0)
    det = create(name).fit(train)
    det.save(tmp_path / name)
    again = load(tmp_path / name)
    for f in (normal, odd):
        s, m = det.score_maps(f)
        s2, m2 = again.score_maps(f)
        np.testing.assert_array_equal(s, s2)
        np.testing.assert_array_equal(m, m2)
        assert s.dtype == np.float64 and m.dtype == np.float32 and np.isfinite(m).all()
    assert det.score(odd).min() > det.score(normal).max()


def test_patchcore_reads_float16_maps_without_converting_them_all():
    f = dense_features(8, 19)
    half = Features(embedding=f.embedding, dense={k: v.astype(np.float16) for k, v in f.dense.items()})
    as32 = Features(embedding=f.embedding, dense={k: v.astype(np.float32) for k, v in half.dense.items()})
    det = create("patchcore", coreset_ratio=0.5)
    inputs = det._inputs(half)
    assert all(v.dtype == torch.float16 for v in inputs["dense"].values())  # wrapped, not converted
    s16, m16 = det.fit(half).score_maps(half)
    s32, m32 = create("patchcore", coreset_ratio=0.5).fit(as32).score_maps(as32)
    np.testing.assert_array_equal(s16, s32)
    np.testing.assert_array_equal(m16, m32)
    half.dense["b"][3, 0, 0, 0] = np.nan
    with pytest.raises(DetectorError, match="NaN"):
        create("patchcore").fit(half)
