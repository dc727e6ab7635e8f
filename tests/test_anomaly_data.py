"""Anomaly data: the MVTec / VisA / MPDD / custom-folder readers with their mask checks, the registry
entries, the seeded synthetic defects (DRAEM-style Perlin noise checked against a per-pixel loop port of
DRAEM's formula) and the offline pixel-level benchmark built from real textures."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oodscope.io import Subset, resolve_images
from oodscope.io.anomaly import AnomalySource, MaskError, anomaly_folder, load_mask, mvtec_category, visa_split
from oodscope.io.registry import get_dataset, list_datasets
from oodscope.io.registry.catalog_anomaly import MVTEC_COUNTS, anomaly_categories
from oodscope.io.synthetic_anomalies import add_defect, fade, perlin_mask, perlin_noise
from oodscope.io.synthetic_benchmark import build_synthetic_mvtec


def _png(path: Path, value: int, size: tuple[int, int] = (8, 6)) -> Path:
    """A (W, H) = size RGB image of one grey value."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)
    return path


def _mask(path: Path, box: tuple[int, int, int, int], size: tuple[int, int] = (8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((size[1], size[0]), np.uint8)
    y0, y1, x0, x1 = box
    m[y0:y1, x0:x1] = 255
    Image.fromarray(m).save(path)
    return path


def _mvtec(root: Path, category: str = "bottle", masks: bool = True) -> Path:
    base = root / category
    for i in range(3):
        _png(base / "train" / "good" / f"{i:03d}.png", 10 + i)
    _png(base / "test" / "good" / "000.png", 50)
    for kind, box in (("broken_large", (0, 2, 0, 2)), ("contamination", (3, 6, 4, 8))):
        for i in range(2):
            _png(base / "test" / kind / f"{i:03d}.png", 100 + i)
            if masks:
                _mask(base / "ground_truth" / kind / f"{i:03d}_mask.png", box)
    return base


# ------------------------------------------------------------------------------------------- readers
def test_mvtec_layout_gives_labels_defect_types_and_masks(tmp_path):
    split = mvtec_category(_mvtec(tmp_path))
    assert len(split.train) == 3 and split.train.labels.tolist() == [0, 0, 0]
    test = split.test
    assert test.labels.tolist() == [1, 1, 1, 1, 0] and test.class_names == ["good", "defect"]
    assert test.defect_types == ["broken_large"] * 2 + ["contamination"] * 2 + ["good"]
    assert test.has_masks
    m = test.mask(0)
    assert m.dtype == bool and m.shape == (6, 8) and m.sum() == 4 and m[:2, :2].all()
    assert not test.mask(4).any() and test.mask(4).shape == (6, 8)  # a good image: all False
    assert test.masks().shape == (5, 6, 8)
    assert test.mask(2, size=(12, 16)).sum() == 4 * 3 * 4  # nearest resize scales the 3x4 box by 2


def test_missing_or_mis_sized_masks_are_named(tmp_path):
    base = _mvtec(tmp_path)
    (base / "ground_truth" / "contamination" / "001_mask.png").unlink()
    with pytest.raises(MaskError, match="001_mask.png"):
        mvtec_category(base)
    _mask(base / "ground_truth" / "contamination" / "001_mask.png", (0, 1, 0, 1), size=(9, 6))
    with pytest.raises(MaskError, match=r"001_mask\.png' is 9x6 but its image .*001\.png' is 8x6"):
        mvtec_category(base)
    (base / "ground_truth" / "contamination" / "001_mask.png").write_bytes(b"not a png")
    with pytest.raises(MaskError, match="001_mask.png' cannot be read"):
        mvtec_category(base)


def test_mvtec_without_ground_truth_has_image_labels_only(tmp_path):
    test = mvtec_category(_mvtec(tmp_path, masks=False)).test
    assert not test.has_masks and test.labels.sum() == 4
    with pytest.raises(MaskError, match=r"defective image .*broken_large/000\.png' has no mask"):
        test.mask(0)


def test_registry_and_resolver_serve_mvtec_and_mpdd_with_masks(tmp_path, monkeypatch):
    _mvtec(tmp_path / "mvtec-ad", "bottle")
    _mvtec(tmp_path / "mpdd", "tubes")
    monkeypatch.setenv("OODSCOPE_DATA", str(tmp_path))
    for name in ("mvtec-ad/bottle/test", "mpdd/tubes/test"):
        src = resolve_images(name)
        assert isinstance(src, AnomalySource) and src.has_masks and len(src) == 5
        assert load_mask(Subset(src, [3, 4]), 0).sum() == 12  # through a wrapper: contamination 001
    assert len(resolve_images("mpdd/tubes/train")) == 3
    assert get_dataset("mvtec-ad/bottle/train").labels.tolist() == [0, 0, 0]


def test_visa_split_table_with_masks(tmp_path):
    rows = [("candle", "train", "normal", "candle/Data/Images/Normal/0000.JPG", ""),
            ("candle", "test", "normal", "candle/Data/Images/Normal/0001.JPG", ""),
            ("candle", "test", "anomaly", "candle/Data/Images/Anomaly/000.JPG", "candle/Data/Masks/Anomaly/000.png")]
    (tmp_path / "split_csv").mkdir()
    with open(tmp_path / "split_csv" / "1cls.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["object", "split", "label", "image", "mask"])
        for row in rows:
            w.writerow(row)
            _png(tmp_path / row[3], 20)
            if row[4]:
                _mask(tmp_path / row[4], (1, 3, 1, 3))
    test = visa_split(tmp_path, "candle", "test")
    assert test.labels.tolist() == [0, 1] and test.has_masks and test.mask(1).sum() == 4
    assert get_dataset("visa/candle/test", tmp_path).mask(1).sum() == 4
    (tmp_path / rows[2][4]).unlink()
    with pytest.raises(MaskError, match="000.png' does not exist"):
        visa_split(tmp_path, "candle", "test")


def test_custom_folder_with_a_mask_rule(tmp_path):
    for i in range(2):
        _png(tmp_path / "good_train" / f"g{i}.png", 5)
        _png(tmp_path / "good_test" / f"t{i}.jpg", 5)
    _png(tmp_path / "bad" / "crack" / "a.jpg", 200)
    _png(tmp_path / "bad" / "b.png", 200)
    _mask(tmp_path / "masks" / "crack" / "a_mask.png", (0, 1, 0, 8))
    _mask(tmp_path / "masks" / "b_mask.png", (5, 6, 0, 8))
    split = anomaly_folder(tmp_path / "good_train", tmp_path / "good_test", tmp_path / "bad", masks=tmp_path / "masks")
    test = split.test
    assert test.labels.tolist() == [0, 0, 1, 1] and test.defect_types == ["good", "good", "defect", "crack"]
    assert test.mask(2)[5].all() and test.mask(3)[0].all() and test.mask(2).sum() == test.mask(3).sum() == 8
    # An orphan mask means the rule does not fit the files.
    _mask(tmp_path / "masks" / "c_mask.png", (0, 1, 0, 1))
    with pytest.raises(MaskError, match="match no defective image.*c_mask.png"):
        anomaly_folder(tmp_path / "good_train", tmp_path / "good_test", tmp_path / "bad", masks=tmp_path / "masks")
    # The {name} rule: masks named like their images.
    (tmp_path / "masks2" / "crack").mkdir(parents=True)
    _mask(tmp_path / "masks2" / "crack" / "a.jpg", (0, 1, 0, 8))
    with pytest.raises(MaskError, match=r"masks2/b\.png' of defective image"):
        anomaly_folder(tmp_path / "good_train", tmp_path / "good_test", tmp_path / "bad", masks=tmp_path / "masks2",
                       mask_rule="{name}")
    no_masks = anomaly_folder(tmp_path / "good_train", tmp_path / "good_test", tmp_path / "bad").test
    assert not no_masks.has_masks and not no_masks.mask(0).any()


def test_registry_entries_and_counts():
    names = {s.name for s in list_datasets(tag="anomaly")}
    assert {"mvtec-ad/bottle/test", "visa/candle/test", "mpdd/tubes/test", "synthetic-ad/brick/test",
            "textiles-ad/train", "textiles-ad/test-local"} <= names
    # The per-category table adds up to the MVTec AD paper's totals.
    assert sum(t for t, _, _ in MVTEC_COUNTS.values()) == 3_629
    assert sum(g + b for _, g, b in MVTEC_COUNTS.values()) == 1_725
    assert sum(b for _, _, b in MVTEC_COUNTS.values()) == 1_258
    assert anomaly_categories("synthetic-ad")[0] == ("brick", "synthetic-ad/brick/train", "synthetic-ad/brick/test")


def test_textiles_as_an_image_level_anomaly_benchmark():
    pytest.importorskip("conformal_clip_data")
    train, test = get_dataset("textiles-ad/train"), get_dataset("textiles-ad/test")
    assert len(train) == 500 and train.labels.sum() == 0
    assert len(test) == 1500 and int(test.labels.sum()) == 1000
    assert set(test.defect_types) == {"good", "local", "global"}
    assert not set(train.paths) & set(test.paths)
    local = get_dataset("textiles-ad/test-local")
    assert len(local) == 1000 and set(local.defect_types) == {"good", "local"}


# ---------------------------------------------------------------------------------- synthetic defects
def _perlin_loop(shape, res, seed):
    """DRAEM's rand_perlin_2d formula pixel by pixel (same gradient draws: angles U(0, 2 pi) on the lattice)."""
    rng = np.random.default_rng(seed)
    angles = rng.uniform(0.0, 2 * math.pi, size=(res[0] + 1, res[1] + 1))
    out = np.zeros(shape)
    for i in range(shape[0]):
        for j in range(shape[1]):
            y, x = i * res[0] / shape[0], j * res[1] / shape[1]
            y0, x0 = int(math.floor(y)), int(math.floor(x))
            fy, fx = y - y0, x - x0

            def dot(cy, cx, fy=fy, fx=fx, y0=y0, x0=x0):
                a = angles[y0 + cy, x0 + cx]
                return math.cos(a) * (fy - cy) + math.sin(a) * (fx - cx)

            sy = 6 * fy**5 - 15 * fy**4 + 10 * fy**3
            sx = 6 * fx**5 - 15 * fx**4 + 10 * fx**3
            top = dot(0, 0) + sx * (dot(0, 1) - dot(0, 0))
            bottom = dot(1, 0) + sx * (dot(1, 1) - dot(1, 0))
            out[i, j] = math.sqrt(2) * (top + sy * (bottom - top))
    return out


def test_perlin_noise_matches_a_loop_port_and_its_properties():
    for shape, res in (((16, 24), (2, 4)), ((20, 20), (4, 1)), ((15, 9), (3, 2))):
        fast = perlin_noise(shape, res, np.random.default_rng(7))
        np.testing.assert_allclose(fast, _perlin_loop(shape, res, 7), atol=1e-12)
    big = perlin_noise((256, 256), (8, 8), np.random.default_rng(1))
    assert big.min() >= -1.0 and big.max() <= 1.0 and big.max() > 0.5  # range [-1, 1], and it is used
    np.testing.assert_allclose(big[::32, ::32], 0.0, atol=1e-12)  # zero on every lattice point
    # Smooth: neighbouring pixels differ by O(res / size), and the second difference by O((res / size)^2).
    d1 = np.abs(np.diff(big, axis=1)).max()
    d2 = np.abs(np.diff(big, n=2, axis=1)).max()
    assert d1 < 4 * 8 / 256 and d2 < 40 * (8 / 256) ** 2
    t = np.linspace(0, 1, 101)
    np.testing.assert_allclose(fade(np.array([0.0, 1.0])), [0.0, 1.0])
    assert np.all(np.diff(fade(t)) >= 0)  # monotone, flat at both ends
    assert abs(fade(np.array([1e-4]))[0]) < 1e-10 and abs(1 - fade(np.array([1 - 1e-4]))[0]) < 1e-10


def test_perlin_mask_is_thresholded_noise_and_deterministic():
    m1, p1 = perlin_mask((64, 64), np.random.default_rng(3))
    m2, p2 = perlin_mask((64, 64), np.random.default_rng(3))
    assert np.array_equal(m1, m2) and p1 == p2 and m1.any() and m1.mean() < 0.5
    assert p1["scale"][0] in (1, 2, 4, 8, 16, 32) and p1["scale"][1] in (1, 2, 4, 8, 16, 32)


def _texture() -> np.ndarray:
    data = pytest.importorskip("skimage.data")
    return np.repeat(data.brick()[:96, :96, None], 3, axis=2)


@pytest.mark.parametrize("kind", ["perlin", "scratch", "hole", "stain"])
def test_each_defect_changes_exactly_its_mask_and_is_seeded(kind):
    img = _texture()
    source = np.full((50, 70, 3), (250, 10, 10), np.uint8)  # a constant fill: its crop is known
    d = add_defect(img, kind, 11, source=source)
    again = add_defect(img, kind, 11, source=source)
    other = add_defect(img, kind, 12, source=source)
    assert np.array_equal(d.image, again.image) and np.array_equal(d.mask, again.mask)
    assert not np.array_equal(d.mask, other.mask)
    assert d.image.dtype == np.uint8 and d.image.shape == img.shape and d.mask.shape == img.shape[:2]
    changed = (d.image != img).any(axis=2)
    assert d.mask.any() and not (changed & ~d.mask).any()  # nothing outside the mask moved
    assert changed[d.mask].mean() > 0.9  # and (up to blends that round to the same value) all of it did
    inside = img[d.mask].astype(float)
    if kind == "perlin":  # DRAEM: (1 - beta) * source + beta * image
        beta = d.params["beta"]
        assert 0 <= beta <= 0.8
        want = np.rint((1 - beta) * np.array([250.0, 10.0, 10.0]) + beta * inside)
    elif kind == "stain":
        a = d.params["opacity"]
        want = np.rint(a * np.array(d.params["colour"]) + (1 - a) * inside)
    elif kind == "scratch":
        want = np.repeat(d.image[d.mask][:1], d.mask.sum(), axis=0)  # one opaque colour
    else:  # hole: at most a quarter of the original brightness, black at the centre
        assert np.all(d.image[d.mask] <= np.rint(0.25 * inside) + 1)
        cy, cx = (int(round(v)) for v in d.params["centre"])
        assert d.image[cy, cx].max() <= 0.25 * img[cy, cx].max() * 0.2 + 1
        return
    np.testing.assert_array_equal(d.image[d.mask], np.clip(want, 0, 255))


def test_unknown_kind_and_missing_source_are_refused():
    with pytest.raises(ValueError, match="kind must be one of"):
        add_defect(_texture(), "dent", 0)
    with pytest.raises(ValueError, match="source texture"):
        add_defect(_texture(), "perlin", 0)


# ------------------------------------------------------------------------------ the offline benchmark
def test_benchmark_builder_writes_a_deterministic_mvtec_layout(tmp_path):
    pytest.importorskip("skimage")
    pytest.importorskip("conformal_clip_data")
    kw = {"n_train": 4, "n_test_good": 3, "n_per_kind": 2, "size": 48, "seed": 5}
    a = build_synthetic_mvtec(tmp_path / "a", ["brick", "textile"], **kw)
    b = build_synthetic_mvtec(tmp_path / "b", ["textile"], **kw)
    for cat in ("brick", "textile"):
        split = mvtec_category(a / cat)
        assert len(split.train) == 4 and len(split.test) == 3 + 4 * 2 and split.test.has_masks
        masks = split.test.masks()
        assert masks.shape == (11, 48, 48)
        good = split.test.labels == 0
        assert not masks[good].any() and all(m.any() for m in masks[~good])
    # A category's files do not depend on the other categories built, and rebuilding gives the same bytes.
    files = sorted(p.relative_to(a / "textile") for p in (a / "textile").rglob("*.png"))
    assert files == sorted(p.relative_to(b / "textile") for p in (b / "textile").rglob("*.png"))
    assert all((a / "textile" / f).read_bytes() == (b / "textile" / f).read_bytes() for f in files)
    # Train crops come from the top half of the photograph, test crops from the bottom half.
    from skimage.data import brick

    photo = brick()
    crop = np.asarray(Image.open(a / "brick" / "train" / "good" / "000.png"))[..., 0]
    hits = [(y, x) for y in range(photo.shape[0] - 47) for x in range(0, photo.shape[1] - 47)
            if photo[y, x] == crop[0, 0] and np.array_equal(photo[y : y + 48, x : x + 48], crop)]
    assert hits and all(y + 48 <= photo.shape[0] // 2 for y, _ in hits)


def test_registered_benchmark_is_built_on_demand(tmp_path, monkeypatch):
    pytest.importorskip("skimage")
    pytest.importorskip("conformal_clip_data")
    monkeypatch.setenv("OODSCOPE_DATA", str(tmp_path))
    test = resolve_images("synthetic-ad/gravel/test")
    assert isinstance(test, AnomalySource) and len(test) == 60 and test.has_masks
    assert sorted(set(test.defect_types)) == ["good", "hole", "perlin", "scratch", "stain"]
    built = list((tmp_path / "synthetic-ad").iterdir())
    assert len(built) == 1 and (built[0] / "manifest.json").is_file()
    assert len(resolve_images("synthetic-ad/textile/train")) == 60  # the same build serves every category
    assert list((tmp_path / "synthetic-ad").iterdir()) == built
