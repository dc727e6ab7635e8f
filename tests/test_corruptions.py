"""ImageNet-C-style corruptions: determinism, identity at severity 0, monotonic strength, shapes,
the exact formulas of the simple ones, and the CorruptedSource wrapper's bytes / cache keys."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from oodscope.evaluation.corruptions import CORRUPTION_NAMES, CorruptedSource, corrupt
from oodscope.evaluation.corruptions import functions as F
from oodscope.evaluation.corruptions import primitives as P
from oodscope.features.extract import content_hash
from oodscope.io import ArrayDataset, Subset


def _photo(size: int = 64, mode: str = "RGB") -> Image.Image:
    """A textured, mid-range test image: smooth colour gradients plus edges and fine texture."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([0.5 + 0.3 * np.sin(6 * x), 0.5 + 0.3 * np.cos(5 * y), 0.4 + 0.2 * x * y], axis=-1)
    base[size // 4 : size // 2, size // 4 : 3 * size // 4] += 0.15  # a rectangle: edges
    base += 0.02 * rng.standard_normal(base.shape)
    arr = np.clip(base * 255, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    return img.convert(mode) if mode != "RGB" else img


def _mse(a: Image.Image, b: Image.Image) -> float:
    return float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))


@pytest.mark.parametrize("name", CORRUPTION_NAMES)
def test_deterministic_shape_mode_and_identity(name: str) -> None:
    img = _photo(48)
    for severity in (1, 3, 5):
        a = corrupt(img, name, severity, seed=3)
        b = corrupt(img, name, severity, seed=3)
        assert a.size == img.size and a.mode == img.mode
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert np.array_equal(np.asarray(corrupt(img, name, 0, seed=3)), np.asarray(img))
    assert corrupt(img, name, 0) is not img  # a copy
    grey = _photo(40, "L")
    out = corrupt(grey, name, 4, seed=1)
    assert out.mode == "L" and out.size == grey.size
    rgba = img.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.full((48, 48), 77, np.uint8)))
    out = corrupt(rgba, name, 2, seed=1)
    assert out.mode == "RGBA" and np.all(np.asarray(out)[..., 3] == 77)
    # severity 1 changes a 224-pixel image (at 48 px a severity-1 blur is sub-pixel and may round away)
    big = _photo(224)
    assert _mse(corrupt(big, name, 1, seed=0), big) > 0


@pytest.mark.parametrize(
    "name", ["gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "motion_blur", "fog"]
)
def test_random_corruptions_depend_on_seed(name: str) -> None:
    img = _photo(48)
    assert not np.array_equal(np.asarray(corrupt(img, name, 3, seed=0)), np.asarray(corrupt(img, name, 3, seed=1)))
    # a sequence seed works too and is deterministic
    twice = [np.asarray(corrupt(img, name, 3, seed=(1, 2))) for _ in range(2)]
    assert np.array_equal(*twice)


MONOTONIC = ["gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "gaussian_blur", "defocus_blur",
             "motion_blur", "zoom_blur", "brightness", "contrast", "jpeg_compression", "pixelate"]


@pytest.mark.parametrize("name", MONOTONIC)
def test_strength_increases_with_severity(name: str, sample_photos) -> None:
    # On natural photos (on synthetic patterns pixelate can alias: a non-integer block size of
    # severity 4 may differ more from the image than the exact 4x4 blocks of severity 5).
    for photo in ("cat", "flower"):
        for size in (112, 224):
            img = Image.fromarray(sample_photos[photo]).resize((size, size))
            errors = [_mse(corrupt(img, name, s, seed=5), img) for s in range(6)]
            assert errors[0] == 0
            assert all(b > a for a, b in zip(errors, errors[1:], strict=False)), (photo, size, errors)


def test_simple_corruptions_match_their_formulas() -> None:
    img = _photo(32)
    x = np.asarray(img, np.float64) / 255
    quant = lambda v: np.clip(np.rint(np.clip(v, 0, 1) * 255), 0, 255)  # noqa: E731
    # contrast: (x - per-channel mean) * c + mean, c = 0.2 at severity 3
    mean = x.mean(axis=(0, 1), keepdims=True)
    np.testing.assert_array_equal(np.asarray(corrupt(img, "contrast", 3)), quant((x - mean) * 0.2 + mean))
    # brightness: HSV value + 0.3 at severity 3, hue and saturation unchanged
    out = np.asarray(corrupt(img, "brightness", 3), np.float64) / 255
    v, v2 = x.max(axis=2), out.max(axis=2)
    np.testing.assert_allclose(v2, np.minimum(v + 0.3, 1.0), atol=1 / 255 + 1e-9)
    sat = lambda a: (a.max(axis=2) - a.min(axis=2)) / a.max(axis=2)  # noqa: E731
    np.testing.assert_allclose(sat(out), sat(x), atol=0.02)
    # gaussian noise: x + 0.18 * N(0, 1), with the generator the module seeds
    rng = F._rng("gaussian_noise", 4)
    expected = quant(x + rng.standard_normal(x.shape) * 0.18)
    np.testing.assert_array_equal(np.asarray(corrupt(img, "gaussian_noise", 3, seed=4)), expected)
    # saturate at severity 3: HSV saturation x2 (clipped at 1) -> channel distances to the value double
    out = np.asarray(corrupt(img, "saturate", 3), np.float64) / 255
    s = (x.max(axis=2) - x.min(axis=2)) / x.max(axis=2)
    ok = s * 2 <= 1
    v = x.max(axis=2, keepdims=True)
    np.testing.assert_allclose(out[ok], quant(v - (v - x) * 2)[ok] / 255, atol=1e-12)
    np.testing.assert_allclose(out.max(axis=2), x.max(axis=2), atol=1 / 255)  # value unchanged
    # fog at severity 2: (x + 2 * plasma) * max / (max + 2), plasma with decay 2 cropped to 224, resized
    rng = F._rng("fog", 9)
    plasma = P.resize_plane(P.plasma_fractal(rng, 2.0)[:224, :224], 32, 32)
    expected = quant((x + 2.0 * plasma[..., None]) * x.max() / (x.max() + 2.0))
    np.testing.assert_array_equal(np.asarray(corrupt(img, "fog", 2, seed=9)), expected)
    # impulse noise replaces about the table's fraction of values with 0 or 255
    out = np.asarray(corrupt(img, "impulse_noise", 5, seed=2))
    changed = out != np.asarray(img)
    assert np.all(np.isin(out[changed], [0, 255]))
    assert 0.2 < changed.mean() < 0.3  # 0.27 of values, minus those that already were 0/255
    # pixelate at 224 px: blocks of the BOX-downsampled image
    big = _photo(224)
    out = np.asarray(corrupt(big, "pixelate", 5))  # factor 0.25 -> 56 x 56, each 4 x 4 block constant
    assert np.all(out[0:4, 0:4] == out[0, 0])
    # jpeg: the image is exactly Pillow's JPEG round trip at quality 15
    import io

    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=15)
    np.testing.assert_array_equal(np.asarray(corrupt(img, "jpeg_compression", 3)), np.asarray(Image.open(buf)))


def test_blur_kernels_preserve_mean_and_constant_images() -> None:
    flat = Image.fromarray(np.full((40, 40, 3), 120, np.uint8))
    for name in ("gaussian_blur", "defocus_blur", "motion_blur", "zoom_blur"):
        assert np.all(np.asarray(corrupt(flat, name, 5, seed=1)) == 120), name
    for radius in (0.3, 1.0, 3.0, 10.0):
        k = P.disk_kernel(radius)
        assert k.shape[0] == k.shape[1] and k.shape[0] % 2 == 1
        assert abs(k.sum() - 1) < 1e-12 and np.allclose(k, k.T) and np.allclose(k, k[::-1])
    # the disk's area is pi r^2 pixels: the kernel's largest weight is 1 / (pi r^2) for a big disk
    assert abs(P.disk_kernel(10).max() - 1 / (np.pi * 100)) < 1e-3
    k = P.motion_kernel(5, 2, 0.0)  # a horizontal streak to the right of the centre
    centre = k.shape[0] // 2
    assert np.allclose(k[centre, :centre], 0) and np.allclose(k.sum(axis=1)[np.arange(k.shape[0]) != centre], 0)


def test_convolution_matches_direct_sum_with_reflect101_borders() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((9, 7, 2))
    k = rng.random((3, 5))
    padded = np.pad(x, ((1, 1), (2, 2), (0, 0)), mode="reflect")  # numpy 'reflect' = OpenCV REFLECT_101
    direct = np.zeros_like(x)
    for i in range(9):
        for j in range(7):
            direct[i, j] = (padded[i : i + 3, j : j + 5] * k[::-1, ::-1, None]).sum(axis=(0, 1))
    np.testing.assert_allclose(P.convolve(x, k), direct, atol=1e-12)


def test_plasma_is_normalised_and_seeded() -> None:
    a = P.plasma_fractal(np.random.default_rng(1), 2.0)
    b = P.plasma_fractal(np.random.default_rng(1), 2.0)
    assert a.shape == (256, 256) and a.min() == 0 and a.max() == 1
    assert np.array_equal(a, b)


def test_invalid_arguments() -> None:
    img = _photo(16)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(img, "snow", 1)
    for bad in (-1, 6, 2.0, True):
        with pytest.raises(ValueError, match="severity"):
            corrupt(img, "contrast", bad)


def _dataset(n: int = 4) -> ArrayDataset:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 12, 12), dtype=np.uint8)
    return ArrayDataset(images, labels=np.arange(n) % 2, class_names=["a", "b"], name="toy")


def test_corrupted_source_bytes_hashes_and_decoding() -> None:
    src = _dataset()
    clean = CorruptedSource(src, "gaussian_noise", 0)
    assert clean.read(1) == src.read(1) and clean.item_id(1) == src.item_id(1)
    hashes = {}
    for name in ("gaussian_noise", "contrast"):
        for severity in (1, 2):
            s = CorruptedSource(src, name, severity, seed=0, work_size=None)
            raw = s.read(1)
            hashes[(name, severity)] = content_hash(raw)
            img = s.decode(1, raw)
            assert img.mode == "RGB" and img.size == (12, 12)
            assert raw == CorruptedSource(src, name, severity, seed=0, work_size=None).read(1)  # deterministic
            content = int.from_bytes(hashlib.blake2b(src.read(1), digest_size=8).digest(), "little")
            expected = corrupt(src.load(1), name, severity, seed=(0, content))
            assert np.array_equal(np.asarray(img), np.asarray(expected))
            assert s.item_id(1) == f"toy:1#{name}@{severity}"
            assert s.labels is src.labels and s.class_names == src.class_names
    hashes["clean"] = content_hash(src.read(1))
    assert len(set(hashes.values())) == len(hashes)  # every corruption / severity has its own cache key
    other_seed = CorruptedSource(src, "gaussian_noise", 1, seed=1, work_size=None)
    assert content_hash(other_seed.read(1)) != hashes[("gaussian_noise", 1)]


def test_corrupted_source_upsamples_small_images_and_is_position_independent() -> None:
    src = _dataset()
    s = CorruptedSource(src, "shot_noise", 2, seed=0, work_size=48)
    assert s.load(0).size == (48, 48)
    # the same image at another position (a Subset) is corrupted identically: seeds come from content
    sub = CorruptedSource(Subset(src, [2, 0]), "shot_noise", 2, seed=0, work_size=48)
    assert sub.read(1) == s.read(0)
    # images already larger than work_size keep their size
    assert CorruptedSource(src, "shot_noise", 2, work_size=8).load(0).size == (12, 12)
    with pytest.raises(ValueError):
        CorruptedSource(src, "shot_noise", 9)
