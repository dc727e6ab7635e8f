"""MuSc and WinCLIP / WinCLIP+ against independent NumPy ports (loops) on tiny inputs, plus properties
and a small real check on the offline synthetic texture benchmark.

The ports are written from the official MuSc code (xrli-U/MuSc ``_LNAMD.py``, ``_MSM.py``,
``_RsCIN.py``) and from anomalib's WinCLIP (``torch_model.py``, ``utils.py``), not from oodscope's.
"""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest

from oodscope.backbones.base import Features
from oodscope.detectors import DetectorError, create, load
from oodscope.detectors.winclip import (
    ANOMALOUS_STATES,
    NORMAL_STATES,
    TEMPLATES,
    harmonic_aggregation,
    prompt_ensemble,
    window_masks,
)


def _features(n: int, c: int, h: int, seed: int, layers: tuple[str, ...] = ("a", "b")) -> Features:
    rng = np.random.default_rng(seed)
    dense = {name: rng.standard_normal((n, c, h, h)).astype(np.float32) for name in layers}
    emb = rng.standard_normal((n, c)).astype(np.float32)
    return Features(embedding=emb, dense=dense)


# ------------------------------------------------------------------------------------------ MuSc
def _musc_port(layers: list[np.ndarray], r_list, low, high, k_list, emb) -> tuple[np.ndarray, np.ndarray]:
    """The official MuSc pipeline with loops (same-grid layers)."""
    n, _, h, w = layers[0].shape
    per_r = []
    for r in r_list:
        per_layer = []
        for x in layers:
            x = x.astype(np.float64)
            z = np.stack([(x[i] - x[i].mean()) / np.sqrt(x[i].var() + 1e-5) for i in range(n)])  # LayerNorm
            pad = (r - 1) // 2
            agg = np.zeros_like(z)
            for i, ch, y, xx in itertools.product(range(n), range(z.shape[1]), range(h), range(w)):
                total = 0.0
                for dy, dx in itertools.product(range(-pad, pad + 1), repeat=2):
                    if 0 <= y + dy < h and 0 <= xx + dx < w:
                        total += z[i, ch, y + dy, xx + dx]
                agg[i, ch, y, xx] = total / (r * r)  # unfold with zero padding, then the mean
            v = agg.reshape(n, agg.shape[1], -1).transpose(0, 2, 1)
            v = v / np.linalg.norm(v, axis=2, keepdims=True)
            out = np.zeros((n, h * w))
            k_min, k_max = int((n - 1) * low), int((n - 1) * high)
            for i in range(n):
                for p in range(h * w):
                    d = sorted(min(np.linalg.norm(v[i, p] - v[j, q]) for q in range(h * w))
                               for j in range(n) if j != i)
                    out[i, p] = np.mean(d[k_min:k_max])
            per_layer.append(out)
        per_r.append(np.mean(per_layer, axis=0))
    amap = np.mean(per_r, axis=0)
    s = amap.max(axis=1)
    if not k_list:
        return s, amap.reshape(n, h, w)
    s = (s - s.min()) / (s.max() - s.min())
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = e @ e.T
    rescored = []
    for k in k_list:
        row = []
        for i in range(n):
            top = np.argsort(-sim[i])[:k]
            row.append(sum(sim[i, j] * s[j] for j in top) / sum(sim[i, j] for j in top))
        rescored.append(row)
    return np.mean(rescored, axis=0), amap.reshape(n, h, w)


@pytest.mark.parametrize("rscin_k", [None, [1, 2, 3]])
def test_musc_matches_the_official_pipeline_with_loops(rscin_k):
    f = _features(7, 3, 4, seed=0)
    # interval [1, 3) of the 6 other images: the interval mean, not just the minimum
    det = create("musc", r_list=[1, 3], topmin_min=0.2, topmin_max=0.5, rscin_k=rscin_k)
    scores, maps = det.score_maps(f)
    want_s, want_m = _musc_port([f.dense["a"], f.dense["b"]], [1, 3], 0.2, 0.5, rscin_k, f.embedding)
    np.testing.assert_allclose(maps, want_m, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(scores, want_s, rtol=1e-4, atol=1e-5)


def test_musc_official_defaults_lowest_30_percent():
    f = _features(11, 2, 3, seed=1, layers=("a",))
    scores, maps = create("musc", rscin_k=None).score_maps(f)  # r in {1, 3, 5}, lowest 30 % of 10 = 3
    want_s, want_m = _musc_port([f.dense["a"]], [1, 3, 5], 0.0, 0.3, None, f.embedding)
    np.testing.assert_allclose(maps, want_m, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(scores, want_s, rtol=1e-4, atol=1e-5)


def test_musc_is_batch_dependent_and_says_so():
    det = create("musc")
    assert det.fit_needs().adaptive and not det.fit_needs().features
    f = _features(8, 3, 4, seed=2)
    whole = det.score(f)
    alone = det.score(f.subset(np.arange(4)))
    assert not np.allclose(whole[:4], alone)  # the other images of the batch change the scores
    # batch_size: subsets scored independently (the official divide_num), near-equal sizes
    split = create("musc", batch_size=4).score_maps(f)
    parts = [det.score_maps(f.subset(np.arange(0, 4))), det.score_maps(f.subset(np.arange(4, 8)))]
    np.testing.assert_array_equal(split[0], np.concatenate([p[0] for p in parts]))
    np.testing.assert_array_equal(split[1], np.concatenate([p[1] for p in parts]))
    with pytest.raises(DetectorError, match="at least 2 images"):
        det.score(f.subset(np.arange(1)))


def test_musc_a_patch_unlike_every_other_image_scores_highest(tmp_path):
    rng = np.random.default_rng(3)
    base = rng.standard_normal((1, 8, 5, 5)).astype(np.float32)
    dense = np.repeat(base, 6, axis=0) + 0.05 * rng.standard_normal((6, 8, 5, 5)).astype(np.float32)
    dense[2, :, 1, 3] *= -1.0  # one anomalous cell in image 2 (its layer-norm statistics barely move)
    f = Features(embedding=rng.standard_normal((6, 8)).astype(np.float32), dense={"x": dense})
    det = create("musc", r_list=[1], rscin_k=None)
    scores, maps = det.score_maps(f)
    assert np.unravel_index(maps[2].argmax(), maps[2].shape) == (1, 3)
    assert scores.argmax() == 2
    det.save(tmp_path / "m")
    again = load(tmp_path / "m")
    assert again.get_params() == det.get_params()
    s2, m2 = again.score_maps(f)
    np.testing.assert_array_equal(s2, scores)
    np.testing.assert_array_equal(m2, maps)
    np.testing.assert_array_equal(det.score_maps(f)[1], maps)  # deterministic


# ------------------------------------------------------------------------------------------ WinCLIP
def test_harmonic_aggregation_by_hand():
    """A 3x3 grid, the four 2x2 windows scored 1, 0.75, 0.5, 0.25 (row-major): each cell is the
    harmonic mean of the windows covering it, e.g. the centre 4 / (1 + 4/3 + 2 + 4) = 0.48."""
    masks = window_masks(3, 3, 2)
    got = harmonic_aggregation(__import__("torch").tensor([[1.0, 0.75, 0.5, 0.25]]), masks).numpy()
    want = [[1.0, 2 / (1 + 4 / 3), 0.75], [2 / (1 + 2), 0.48, 2 / (4 / 3 + 4)], [0.5, 2 / (2 + 4), 0.25]]
    np.testing.assert_allclose(got.reshape(3, 3), want, rtol=1e-6)


def test_prompt_ensemble_is_the_compositional_list():
    normal, anomalous = prompt_ensemble("fabric")
    assert len(normal) == 7 * 21 and len(anomalous) == 4 * 21
    assert len(NORMAL_STATES) == 7 and len(ANOMALOUS_STATES) == 4 and len(TEMPLATES) == 21
    assert "a photo of a flawless fabric for visual inspection." in normal
    assert "a cropped photo of the damaged fabric." in anomalous
    assert all("fabric" in p for p in normal + anomalous)
    _, filo = prompt_ensemble("fabric", "filo")
    assert "a photo of a fabric with a crack." in filo and not set(filo) & set(anomalous)


class StateEncoder:
    """Prompts with an anomalous state -> near one direction, others -> near another (seeded per text)."""

    def __init__(self, dim: int) -> None:
        self.id = f"test-state-encoder-{dim}"  # the text cache is keyed by the id
        rng = np.random.default_rng(5)
        self.normal, self.anomalous = rng.standard_normal((2, dim))
        self.dim = dim

    def encode_texts(self, texts):
        rows = []
        for t in texts:
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:4], "little")
            noise = np.random.default_rng(seed).standard_normal(self.dim) * 0.3
            bad = any(w in t for w in ("damaged", "with flaw", "with defect", "with damage"))
            rows.append((self.anomalous if bad else self.normal) + noise)
        return np.asarray(rows, np.float32)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _winclip_port(emb, grid, refs, text, scales, temperature):
    """anomalib's WinClipModel.forward with loops; window embedding = mean of its patches."""
    n, d, h, w = grid.shape

    def cls(v):
        c = _unit(v) @ _unit(text).T / temperature
        e = np.exp(c - c.max())
        return e[1] / e.sum()

    def windows(g, s):  # row-major window positions, each the list of its cells
        out = []
        for y, x in itertools.product(range(h - s + 1), range(w - s + 1)):
            cells = [(y + a) * w + (x + b) for a in range(s) for b in range(s)]
            out.append((cells, g.reshape(d, -1)[:, cells].mean(axis=1)))
        return out

    def harmonic(values):
        return len(values) / sum(1 / v for v in values)

    def assoc(v, ref):
        return min((1 - _unit(v) @ _unit(r)) / 2 for r in ref)

    scores, maps = [], []
    for i in range(n):
        image = cls(emb[i])
        zero = [np.full(h * w, image)]
        few = []
        if refs is not None:
            ref_patches = [r.reshape(d, -1)[:, p] for r in refs for p in range(h * w)]
            few.append(np.array([assoc(grid[i].reshape(d, -1)[:, p], ref_patches) for p in range(h * w)]))
        for s in scales:
            wins = windows(grid[i], s)
            win_scores = [cls(v) for _, v in wins]
            zero.append(np.array([harmonic([sc for (cells, _), sc in zip(wins, win_scores, strict=True) if p in cells])
                                  for p in range(h * w)]))
            if refs is not None:
                ref_wins = [v for r in refs for _, v in windows(r, s)]
                a = [assoc(v, ref_wins) for _, v in wins]
                few.append(np.array([harmonic([sc for (cells, _), sc in zip(wins, a, strict=True) if p in cells])
                                     for p in range(h * w)]))
        zmap = np.array([harmonic([z[p] for z in zero]) for p in range(h * w)])
        if refs is None:
            scores.append(image)
            maps.append(zmap)
        else:
            fmap = np.mean(few, axis=0)
            scores.append((image + fmap.max()) / 2)
            maps.append((zmap + fmap) / 2)
    return np.array(scores), np.array(maps).reshape(n, h, w)


@pytest.mark.parametrize("k_shot", [0, 2])
def test_winclip_matches_the_anomalib_forward_with_loops(k_shot, tmp_path):
    d = 6
    enc = StateEncoder(d)
    rng = np.random.default_rng(7)
    fit = Features(embedding=rng.standard_normal((5, d)).astype(np.float32),
                   dense={"value_path": rng.standard_normal((5, d, 4, 4)).astype(np.float32)})
    test = Features(embedding=rng.standard_normal((3, d)).astype(np.float32),
                    dense={"value_path": rng.standard_normal((3, d, 4, 4)).astype(np.float32)})
    det = create("winclip", object_name="fabric", k_shot=k_shot, temperature=0.5, seed=1)
    det.fit(fit if k_shot else None, text_encoder=enc)
    scores, maps = det.score_maps(test)
    normal, anomalous = prompt_ensemble("fabric")
    text = np.stack([_unit(enc.encode_texts(normal).astype(np.float64)).mean(0),
                     _unit(enc.encode_texts(anomalous).astype(np.float64)).mean(0)])
    refs = None
    if k_shot:
        rows = det.fit_info_["reference_rows"]
        assert len(rows) == 2 and rows == sorted(np.random.default_rng(1).choice(5, 2, replace=False).tolist())
        refs = fit.dense["value_path"][rows].astype(np.float64)
    want_s, want_m = _winclip_port(test.embedding.astype(np.float64), test.dense["value_path"].astype(np.float64),
                                   refs, text, [2, 3], 0.5)
    np.testing.assert_allclose(scores, want_s, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(maps, want_m, rtol=1e-4, atol=1e-6)
    det.save(tmp_path / "w")
    again = load(tmp_path / "w")
    s2, m2 = again.score_maps(test)
    np.testing.assert_array_equal(s2, scores)
    np.testing.assert_array_equal(m2, maps)
    # rows are independent (not batch-dependent, unlike MuSc)
    np.testing.assert_allclose(det.score_maps(test.subset(np.array([2])))[1], maps[2:3], rtol=1e-5, atol=1e-7)


def test_winclip_needs_and_errors():
    assert create("winclip").fit_needs().text_encoder and not create("winclip").fit_needs().features
    assert create("winclip", k_shot=1).fit_needs().features
    with pytest.raises(DetectorError, match="text"):
        create("winclip").fit(None)
    det = create("winclip").fit(None, text_encoder=StateEncoder(5))
    wrong = _features(2, 4, 4, seed=0, layers=("value_path",))
    with pytest.raises(DetectorError, match="joint image-text"):
        det.score(wrong)
    with pytest.raises(DetectorError, match="prompts"):
        create("winclip", prompts="other")


# ------------------------------------------------------------------------------------------ real images
@pytest.fixture(scope="module")
def brick(tmp_path_factory):
    """synthetic-ad's brick (skimage's photograph, DRAEM-style defects): 8 train, 10 good + 12 defective test."""
    pytest.importorskip("efficientnet_lite_pytorch")
    from oodscope.io.anomaly import mvtec_category
    from oodscope.io.synthetic_benchmark import build_synthetic_mvtec

    root = build_synthetic_mvtec(tmp_path_factory.mktemp("syn"), ["brick"], n_train=8, n_test_good=10,
                                 n_per_kind=3, size=128, seed=0)
    return mvtec_category(root / "brick")


def _extract(spec: str, source):
    from oodscope.backbones import create as create_backbone
    from oodscope.features.extract import extract

    backbone = create_backbone(spec, device="cpu")
    return backbone, extract(backbone, source, num_workers=0, progress=False).features


def test_musc_separates_synthetic_defects_on_real_textures(brick):
    from sklearn.metrics import roc_auc_score

    _, test = _extract("effnet-lite0@96?dense", brick.test)
    auroc = roc_auc_score(brick.test.labels, create("musc").score(test))
    assert auroc > 0.9, auroc  # measured 1.00 (no training image seen)


def test_winclip_few_shot_on_the_packaged_conse_grid(brick):
    from sklearn.metrics import roc_auc_score

    backbone, test = _extract("conse:effnet-lite0@224?dense=conse", brick.test)
    _, train = _extract("conse:effnet-lite0@224?dense=conse", brick.train)
    assert test.dense["conse"].shape[1:] == (test.embedding.shape[1], 7, 7)
    det = create("winclip", object_name="brick", k_shot=4).fit(train, text_encoder=backbone)
    auroc = roc_auc_score(brick.test.labels, det.score(test))
    assert auroc > 0.8, auroc  # measured 0.97 (zero-shot alone: 0.64, ConSE's text space is coarse)


def test_winclip_on_a_tiny_random_hf_clip(tmp_path):
    """The dense value-path grid and the image embedding of an HF CLIP (random, 4 x 4 patches) are what
    WinCLIP reads by default; the texts come from a stand-in encoder of the same (projection) width, as
    the tiny model has no tokenizer."""
    transformers = pytest.importorskip("transformers")
    import torch

    from oodscope.backbones import create as create_backbone

    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=8),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(tmp_path / "clip")
    backbone = create_backbone(f"hf:{tmp_path / 'clip'}?dense", device="cpu")
    images = torch.randn(5, 3, 32, 32)
    feats = backbone.encode_images(images)
    assert feats.dense["value_path"].shape == (5, 16, 4, 4)
    det = create("winclip", object_name="screw", k_shot=2).fit(feats.subset(np.arange(3)),
                                                               text_encoder=StateEncoder(16))
    assert det.fit_info_["layer"] == "value_path"
    scores, maps = det.score_maps(feats.subset(np.arange(3, 5)))
    assert scores.shape == (2,) and maps.shape == (2, 4, 4) and np.isfinite(maps).all()
    # a reference image itself: its few-shot association is 0 everywhere, so it scores lower
    ref = det.fit_info_["reference_rows"][0]
    own = det.score_maps(feats.subset(np.array([ref])))[1]
    assert own.max() < maps.max()
