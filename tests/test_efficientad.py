"""EfficientAD (Batzner, Heckler & König, WACV 2024): the PDN's geometry, the hard-feature loss and the
quantile map normalisation against independent NumPy computations, seeding, persistence, and a small
real fit that finds synthetic defects on real texture crops."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from oodscope.detectors import DetectorError, create, load
from oodscope.detectors._efficientad import (
    MAP_PAD,
    AutoEncoder,
    PDNSmall,
    hard_loss,
    load_teacher,
    quantile_normalize,
    receptive_field,
)

FAST = {"image_size": 64, "steps": 3}


# --------------------------------------------------------------------------- architecture
def test_pdn_receptive_field_is_33_pixels_by_the_gradient_support() -> None:
    torch.manual_seed(0)
    net = PDNSmall(8)
    with torch.no_grad():  # positive weights and biases: every ReLU passes, so the support is the whole field
        for p in net.parameters():
            p.copy_(p.abs() + 0.01)
    x = torch.zeros(1, 3, 80, 80, requires_grad=True)
    out = net(x)
    i, j = out.shape[2] // 2, out.shape[3] // 2
    out[0, 0, i, j].backward()
    rows = np.flatnonzero(x.grad[0].abs().sum(dim=(0, 2)).numpy() > 0)
    cols = np.flatnonzero(x.grad[0].abs().sum(dim=(0, 1)).numpy() > 0)
    assert rows[-1] - rows[0] + 1 == 33 and cols[-1] - cols[0] + 1 == 33
    assert rows[0] == 4 * i and cols[0] == 4 * j  # output stride 4
    assert receptive_field(net) == 33


def test_pdn_and_autoencoder_output_shapes() -> None:
    teacher, student = PDNSmall(384), PDNSmall(768)
    with torch.no_grad():
        assert teacher(torch.zeros(1, 3, 256, 256)).shape == (1, 384, 56, 56)  # the paper's 256 px -> 56 x 56
        assert teacher(torch.zeros(1, 3, 256, 256), padding=True).shape == (1, 384, 64, 64)
        assert student(torch.zeros(2, 3, 128, 128)).shape == (2, 768, 24, 24)
        for size in (64, 128, 256):  # the autoencoder ends at the unpadded teacher's grid
            side = size // 4 - 8
            assert AutoEncoder(size).eval()(torch.zeros(1, 3, size, size)).shape == (1, 384, side, side)
    conv_layers = [m for m in teacher.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in conv_layers] == [(128, (4, 4)), (256, (4, 4)), (256, (3, 3)),
                                                                      (384, (4, 4))]


# --------------------------------------------------------------------------- losses and normalisation
def test_hard_loss_is_the_mean_above_the_quantile() -> None:
    d = torch.arange(1, 1001, dtype=torch.float64).reshape(10, 10, 10)
    # by hand: the 0.999 quantile of 1..1000 (linear) is 999 + 0.001 = 999.001, so only 1000 is hard
    assert float(hard_loss(d, 0.999)) == 1000.0
    assert float(hard_loss(d, 0.99)) == pytest.approx(np.mean(np.arange(991, 1001)))  # q = 990.01: 991..1000
    rng = np.random.default_rng(0)
    values = rng.random((2, 5, 3, 3)) ** 3
    t = torch.tensor(values, requires_grad=True)
    for q in (0.5, 0.9, 0.999):
        flat = np.sort(values.ravel())
        pos = q * (len(flat) - 1)  # numpy-free linear quantile, written out
        lo, hi = flat[int(np.floor(pos))], flat[int(np.ceil(pos))]
        threshold = lo + (pos - np.floor(pos)) * (hi - lo)
        want = flat[flat >= threshold].mean()
        assert float(hard_loss(t.detach(), q)) == pytest.approx(want, rel=1e-12)
    t.grad = None
    hard_loss(t, 0.9).backward()
    assert int((t.grad != 0).sum()) == int((values >= np.quantile(values, 0.9)).sum())  # only the hard ones train


def test_hard_loss_subsamples_the_quantile_beyond_its_limit() -> None:
    d = torch.rand(5000, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    sub = hard_loss(d, 0.9, max_elements=1000, generator=g)
    full = hard_loss(d, 0.9)
    assert abs(float(sub) - float(full)) < 0.02


def test_quantile_normalisation_by_hand() -> None:
    m = torch.tensor([2.0, 3.0, 4.0, 6.0])
    np.testing.assert_allclose(quantile_normalize(m, 2.0, 4.0).numpy(), [0.0, 0.05, 0.1, 0.2])


@pytest.fixture(scope="module")
def textures() -> dict[str, np.ndarray]:
    """64 px crops of scikit-image's brick photograph: training ones from its top half, test ones
    (normal, and with one synthetic hole / stain / scratch each) from its bottom half."""
    data = pytest.importorskip("skimage.data")
    from oodscope.io.synthetic_anomalies import add_defect

    img = np.asarray(data.brick())
    img = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]
    rng = np.random.default_rng(0)

    def crops(rows: tuple[int, int], n: int) -> list[np.ndarray]:
        out = []
        for _ in range(n):
            y, x = rng.integers(rows[0], rows[1] - 64), rng.integers(0, img.shape[1] - 64)
            out.append(img[y:y + 64, x:x + 64])
        return out

    half = img.shape[0] // 2
    train = crops((0, half), 24)
    good = crops((half, img.shape[0]), 12)
    bad = [add_defect(c, ("hole", "stain", "scratch")[k % 3], 100 + k).image for k, c in
           enumerate(crops((half, img.shape[0]), 12))]
    as_batch = lambda xs: np.stack(xs).transpose(0, 3, 1, 2).astype(np.float32) / 255.0  # noqa: E731
    return {"train": as_batch(train), "good": as_batch(good), "bad": as_batch(bad)}


@pytest.fixture(scope="module")
def fitted(textures):
    det = create("efficientad", image_size=64, steps=20, seed=0)
    det.fit(parts=None, images=textures["train"])
    return det


def test_maps_are_the_quantile_normalised_average_of_the_two_maps(fitted, textures) -> None:
    det = fitted
    # the validation images: the seeded split of the fit (10 % of 24 -> 2 images)
    order = torch.randperm(24, generator=torch.Generator().manual_seed(0)).numpy()
    val = torch.from_numpy(textures["train"][order[:2]])
    with torch.no_grad():
        st, ae = (m.numpy().astype(np.float64) for m in det.raw_maps(val))
    qa, qb = 0.9, 0.995
    np.testing.assert_allclose(det.state_["quantiles_st"].numpy(), np.quantile(st, [qa, qb]), rtol=1e-5)
    np.testing.assert_allclose(det.state_["quantiles_ae"].numpy(), np.quantile(ae, [qa, qb]), rtol=1e-5)
    # the map of the test images, by hand: pad the raw maps with zeros, normalise, average; score = max
    x = torch.from_numpy(textures["bad"][:4])
    with torch.no_grad():
        st, ae = (np.pad(m.numpy().astype(np.float64), ((0, 0), (MAP_PAD, MAP_PAD), (MAP_PAD, MAP_PAD)))
                  for m in det.raw_maps(x))
    a_st, b_st = det.state_["quantiles_st"].numpy().astype(np.float64)
    a_ae, b_ae = det.state_["quantiles_ae"].numpy().astype(np.float64)
    want = 0.5 * 0.1 * (st - a_st) / (b_st - a_st) + 0.5 * 0.1 * (ae - a_ae) / (b_ae - a_ae)
    scores, maps = det.score_image_maps(None, x)
    assert maps.shape == (4, 16, 16) and maps.dtype == np.float32
    np.testing.assert_allclose(maps, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(scores, want.reshape(4, -1).max(axis=1), rtol=1e-4, atol=1e-6)
    # the normal validation maps sit mostly below 0 (q_a -> 0) and rarely above 0.1 (q_b -> 0.1)
    with torch.no_grad():
        n_st, _ = det.normalized_maps(val)
    inner = n_st[:, MAP_PAD:-MAP_PAD, MAP_PAD:-MAP_PAD].numpy()
    assert (inner <= 1e-6).mean() == pytest.approx(0.9, abs=0.01)
    assert (inner <= 0.1 + 1e-6).mean() == pytest.approx(0.995, abs=0.01)


def test_a_real_fit_separates_synthetic_defects_from_normal_crops(fitted, textures) -> None:
    from sklearn.metrics import roc_auc_score

    good = fitted.score_images(None, textures["good"])
    bad = fitted.score_images(None, textures["bad"])
    auroc = roc_auc_score(np.r_[np.zeros(len(good)), np.ones(len(bad))], np.r_[good, bad])
    assert auroc > 0.75, auroc
    info = fitted.fit_info_
    assert info["n_train"] == 22 and info["n_validation"] == 2 and info["steps"] == 20


# --------------------------------------------------------------------------- seeds, persistence, inputs
def test_the_fit_is_a_function_of_the_seed(textures) -> None:
    images = textures["train"][:6]
    a = create("efficientad", seed=3, **FAST).fit(parts=None, images=images)
    b = create("efficientad", seed=3, **FAST).fit(parts=None, images=images)
    c = create("efficientad", seed=4, **FAST).fit(parts=None, images=images)
    assert a.state_.keys() == b.state_.keys()
    for k in a.state_:
        assert torch.equal(a.state_[k], b.state_[k]), k
    assert not torch.equal(a.state_["student.conv4.weight"], c.state_["student.conv4.weight"])
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    create("efficientad", seed=3, **FAST).fit(parts=None, images=images)
    assert torch.equal(torch.rand(1), before)  # the caller's global RNG is left alone


def test_save_load_gives_identical_maps_from_json_and_safetensors(fitted, textures, tmp_path) -> None:
    fitted.save(tmp_path / "ead")
    assert sorted(p.suffix for p in (tmp_path / "ead").iterdir()) == [".json", ".safetensors"]
    again = load(tmp_path / "ead")
    s1, m1 = fitted.score_image_maps(None, textures["bad"])
    s2, m2 = again.score_image_maps(None, textures["bad"])
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(m1, m2)
    config = json.loads(next((tmp_path / "ead").glob("*.json")).read_text())
    assert config["fit_info"]["teacher_sha256"] == load_teacher().sha256


def test_normalised_images_are_brought_back_to_pixels(fitted, textures) -> None:
    from oodscope.backbones.base import InputSpec

    spec = InputSpec(size=64, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    x = textures["bad"][:3]
    mean, std = (np.array(v, np.float32)[None, :, None, None] for v in (spec.mean, spec.std))
    normalized = (x - mean) / std
    np.testing.assert_allclose(fitted.score_images(spec, normalized), fitted.score_images(None, x), rtol=1e-4)


def test_features_are_refused_with_the_image_path_named(fitted) -> None:
    with pytest.raises(DetectorError, match="score_images"):
        fitted.score({"dense": {"a": np.zeros((1, 3, 4, 4), np.float32)}})
    with pytest.raises(DetectorError, match="images"):
        create("efficientad", **FAST).fit()
    with pytest.raises(DetectorError, match="image_size"):
        create("efficientad", image_size=100)


def test_the_packaged_teacher_is_small_and_says_how_it_was_built() -> None:
    from importlib import resources

    from oodscope.detectors._efficientad import TEACHER_FILE

    path = resources.files("oodscope.data") / TEACHER_FILE
    assert path.stat().st_size < 10e6 if hasattr(path, "stat") else True
    teacher = load_teacher()
    assert receptive_field(teacher.network) == 33
    assert teacher.penalty.dtype == torch.uint8 and teacher.penalty.shape[1:] == (3, 128, 128)
    for key in ("seed", "steps", "build_seconds", "held_out_r2", "sources"):
        assert key in teacher.meta
