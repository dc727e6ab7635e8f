"""Image anomaly detection through OODModel and the command line: fit on a folder of good images,
conformal image threshold on held-out good images, ``score --maps DIR`` (float16 .npy + PNG
overlays at each image's own resolution), saved models, and the map geometry.

Images are real textures (scikit-image's brick; defects are gravel patches pasted in), at several
sizes and aspect ratios; the backbone is the packaged EfficientNet-Lite0 at 64 px. The detector is a
test-local one (distance of each cell's features to that cell's mean over the good images), put into
the registry for the duration of this module only: the anomaly methods of the package are tested by
the contract suite and their own tests.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from oodscope.backbones.base import InputSpec
from oodscope.cli.main import main
from oodscope.detectors import base as detectors_base
from oodscope.detectors._anomaly import AnomalyDetector, dense_inputs, upsample_maps
from oodscope.pipeline import OODModel
from oodscope.pipeline.maps import heatmap_overlay, map_file_names, to_image_geometry

skimage_data = pytest.importorskip("skimage.data")
BACKBONE = "effnet-lite0@64"
METHOD = "test_cell_mean_distance"


class CellMeanDistance(AnomalyDetector):
    """Test-local, not part of oodscope (oodscope's own, for tests): map = squared distance of each
    cell's features to the mean of that cell over the good images; image score = the map's maximum."""

    name: ClassVar[str] = METHOD

    def __init__(self, layer: str | None = None) -> None:
        super().__init__()
        self.layer = layer

    def _fit(self, inputs, labels) -> None:
        maps = dense_inputs(inputs, None if self.layer is None else [self.layer], self.name)
        self.state_["mean"] = next(iter(maps.values())).mean(dim=0)

    def _score_maps(self, inputs):
        x = next(iter(dense_inputs(inputs, None if self.layer is None else [self.layer], self.name).values()))
        maps = ((x - self._state("mean", x)) ** 2).sum(dim=1)
        return maps.flatten(1).max(dim=1).values, maps


@pytest.fixture(scope="module", autouse=True)
def _local_detector():
    detectors_base._REGISTRY[METHOD] = CellMeanDistance
    yield
    detectors_base._REGISTRY.pop(METHOD, None)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    pytest.importorskip("efficientnet_lite_pytorch")
    root = tmp_path_factory.mktemp("anomaly-folders")
    brick = skimage_data.brick()
    gravel = skimage_data.gravel()
    rng = np.random.default_rng(0)
    sizes = [(96, 96), (120, 80), (80, 112)]  # (W, H)

    def crop(texture, w, h):
        y, x = rng.integers(0, 512 - h), rng.integers(0, 512 - w)
        return np.stack([texture[y:y + h, x:x + w]] * 3, axis=-1)

    (root / "good").mkdir()
    for k in range(28):
        w, h = sizes[k % 3]
        Image.fromarray(crop(brick, w, h)).save(root / "good" / f"good_{k:02d}.png")
    (root / "test" / "good").mkdir(parents=True)
    (root / "test" / "defect").mkdir()
    boxes = {}
    for k in range(4):
        w, h = sizes[k % 3]
        Image.fromarray(crop(brick, w, h)).save(root / "test" / "good" / f"ok_{k}.png")
        img = crop(brick, w, h)
        bw, bh = w // 3, h // 3
        x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        img[y0:y0 + bh, x0:x0 + bw] = crop(gravel, bw, bh)
        Image.fromarray(img).save(root / "test" / "defect" / f"bad_{k}.png")
        boxes[f"bad_{k}"] = (x0, y0, bw, bh)
    return root, boxes


def run_cli(args, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def fitted_dir(folders, tmp_path_factory):
    root, _ = folders
    out = tmp_path_factory.mktemp("anomaly-model") / "model"
    code = main(["fit", "--backbone", BACKBONE, "--method", METHOD, "--id-dir", str(root / "good"),
                 "--alpha", "0.2", "--workers", "0", "--no-cache", "-o", str(out)])
    assert code == 0
    return out


def test_fit_on_good_images_calibrates_the_image_threshold(fitted_dir):
    model = OODModel.load(fitted_dir, progress=False)
    assert model.kind.value == "anomaly" and model.is_calibrated
    assert model.backbone.dense_layers == ("stage3", "stage5")  # asked for by the method's kind
    assert model.backbone.input_spec.resize == "stretch"
    n_cal = model.info_["calibration"]["n"]
    assert n_cal >= 4 and model.info_["fit"]["n"] + n_cal == 28  # 0.3 of the good images held out
    # the threshold is the conformal one: the k-th smallest held-out score, k = ceil((n + 1)(1 - alpha))
    cal = np.sort(model.pvalues_.cal_scores)
    k = int(np.ceil((n_cal + 1) * (1 - 0.2)))
    assert model.threshold.value == pytest.approx(cal[k - 1])


def test_score_maps_writes_npy_and_png_per_image(folders, fitted_dir, tmp_path, capsys):
    root, boxes = folders
    maps_dir = tmp_path / "maps"
    code, out, err = run_cli(["score", fitted_dir, root / "test", "--maps", maps_dir, "--format", "csv",
                              "--workers", "0", "--no-cache"], capsys)
    assert code == 0, err
    assert "maps of 8 image(s) written" in err
    rows = {Path(r["item"]).stem: r for r in csv.DictReader(out.splitlines())}
    index = {Path(r["item"]).stem: r for r in csv.DictReader((maps_dir / "maps.csv").read_text().splitlines())}
    assert set(index) == set(rows) and len(rows) == 8
    for stem, row in index.items():
        sub = "defect" if stem.startswith("bad") else "good"
        assert row["npy"] == f"{sub}/{stem}.npy" and row["png"] == f"{sub}/{stem}.png"
        image = Image.open(root / "test" / sub / f"{stem}.png")
        amap = np.load(maps_dir / row["npy"], allow_pickle=False)
        assert amap.dtype == np.float16 and amap.shape == (image.height, image.width)
        assert (int(row["height"]), int(row["width"])) == amap.shape
        assert np.isfinite(amap).all()
        overlay = Image.open(maps_dir / row["png"])
        assert overlay.size == image.size and overlay.mode == "RGB"
        assert float(row["score"]) == pytest.approx(float(rows[stem]["score"]))
    # the pasted gravel is where the maps are high, and defective images score higher
    for stem, (x0, y0, bw, bh) in boxes.items():
        amap = np.load(maps_dir / index[stem]["npy"], allow_pickle=False).astype(np.float64)
        inside = np.zeros(amap.shape, bool)
        inside[y0:y0 + bh, x0:x0 + bw] = True
        assert amap[inside].mean() > amap[~inside].mean(), stem
    bad = [float(rows[s]["score"]) for s in rows if s.startswith("bad")]
    good = [float(rows[s]["score"]) for s in rows if s.startswith("ok")]
    assert np.mean(bad) > np.mean(good)  # a crude test-local detector: on average, not image by image


def test_score_maps_user_errors_exit_2(folders, fitted_dir, tmp_path, capsys):
    root, _ = folders
    full = tmp_path / "full"
    full.mkdir()
    (full / "something.txt").write_text("x")
    code, _, err = run_cli(["score", fitted_dir, root / "test", "--maps", full], capsys)
    assert code == 2 and "--maps" in err and "not empty" in err
    code, _, err = run_cli(["score", fitted_dir, root / "test", "--maps", full / "something.txt"], capsys)
    assert code == 2 and "is a file" in err
    # a model of a method without maps
    knn_dir = tmp_path / "knn"
    assert main(["fit", "--backbone", BACKBONE, "--method", "knn", "--id-dir", str(root / "good"), "--alpha", "0.2",
                 "--workers", "0", "--no-cache", "-o", str(knn_dir)]) == 0
    capsys.readouterr()
    code, _, err = run_cli(["score", knn_dir, root / "test", "--maps", tmp_path / "m"], capsys)
    assert code == 2 and "needs an image anomaly method" in err
    assert not (tmp_path / "m").exists()
    code, _, err = run_cli(["fit", "--backbone", BACKBONE, "--method", METHOD, "-o", tmp_path / "x"], capsys)
    assert code == 2 and "learns from good (normal) images: give --id-dir" in err


def test_python_api_maps_and_save_load_round_trip(folders, tmp_path):
    root, _ = folders
    model = OODModel(BACKBONE, METHOD, alpha=0.2, progress=False, num_workers=0).fit(root / "good")
    test_dir = root / "test"
    scores, maps = model.score_maps(test_dir)
    files = sorted(test_dir.rglob("*.png"))
    assert len(maps) == len(files) == 8
    predictions = model.predict(test_dir)
    np.testing.assert_allclose(scores, predictions.scores)  # the same scores as every other detector
    for amap, item in zip(maps, predictions.item_ids, strict=True):
        with Image.open(item) as image:
            assert amap.shape == (image.height, image.width) and amap.dtype == np.float32
    model.save(tmp_path / "saved")
    again = OODModel.load(tmp_path / "saved", progress=False, num_workers=0)
    s2, m2 = again.score_maps(test_dir)
    np.testing.assert_array_equal(s2, scores)
    for a, b in zip(m2, maps, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(again.pvalues_.cal_scores, model.pvalues_.cal_scores)
    # precomputed features: maps at the network's input size, the frame of the geometry step
    features = model._data(test_dir, "features", progress=False).features
    f_scores, frame = model.score_maps(features)
    assert frame.shape == (8, 64, 64)
    np.testing.assert_allclose(f_scores, scores)
    with pytest.raises(ValueError, match="no anomaly maps"):
        OODModel(BACKBONE, "knn", alpha=0.2, progress=False, num_workers=0).fit(root / "good").score_maps(test_dir)


# ------------------------------------------------------------------------------ geometry and overlays
def _spec(resize: str, size: int = 8, crop: float = 1.0) -> InputSpec:
    return InputSpec(size=size, mean=(0.5,) * 3, std=(0.5,) * 3, resize=resize, crop_fraction=crop)


def test_stretch_geometry_is_bilinear_resizing():
    frame = np.random.default_rng(0).random((8, 8))
    got = to_image_geometry(frame, _spec("stretch"), (20, 12))
    want = torch.nn.functional.interpolate(torch.from_numpy(frame)[None, None], size=(12, 20), mode="bilinear",
                                           align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_centre_crop_geometry_covers_the_crop_only():
    frame = np.random.default_rng(1).random((8, 8))
    # a 24 x 16 image, crop_fraction 1: the centre 16 x 16 square (x from 4 to 20) was the network's input
    got = to_image_geometry(frame, _spec("shorter_center_crop"), (24, 16))
    assert np.isnan(got[:, :4]).all() and np.isnan(got[:, 20:]).all()
    want = torch.nn.functional.interpolate(torch.from_numpy(frame)[None, None], size=(16, 16), mode="bilinear",
                                           align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(got[:, 4:20], want, rtol=1e-5, atol=1e-6)


def test_letterbox_geometry_drops_the_padding():
    frame = np.zeros((8, 8))
    frame[2:6] = 1.0  # a 16 x 8 image letterboxed into 8 x 8: rows 2..5 hold it, the rest is padding
    got = to_image_geometry(frame, _spec("letterbox"), (16, 8))
    np.testing.assert_allclose(got, 1.0)


def test_upsampled_frame_then_geometry_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    grid = np.random.default_rng(2).random((1, 4, 4)).astype(np.float32)
    frame = upsample_maps(grid, (32, 32), sigma=2.0)[0]
    up = torch.nn.functional.interpolate(torch.from_numpy(grid)[None], size=(32, 32), mode="bilinear",
                                         align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(frame, ndimage.gaussian_filter(up, 2.0), rtol=1e-4, atol=1e-5)


def test_overlay_blends_and_leaves_uncovered_pixels_alone(monkeypatch):
    import sys

    image = Image.fromarray(np.full((4, 6, 3), 100, np.uint8))
    amap = np.tile(np.linspace(0, 1, 6), (4, 1))
    amap[0, 0] = np.nan
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the built-in colour map
    out = np.asarray(heatmap_overlay(image, amap, alpha=0.5)).astype(int)
    assert out.shape == (4, 6, 3)
    np.testing.assert_array_equal(out[0, 0], [100, 100, 100])  # NaN: the image alone
    np.testing.assert_array_equal(out[1, 0], [50, 50, 114])  # lowest value: jet's dark blue (0, 0, 128), half
    np.testing.assert_array_equal(out[1, 5], [114, 50, 50])  # highest: dark red
    with pytest.raises(ValueError, match="does not match"):
        heatmap_overlay(image, amap[:2])


def test_map_file_names_are_relative_and_unique():
    assert map_file_names(["/d/good/a.png", "/d/bad/a.png", "/d/bad/a.jpg"]) == ["good/a", "bad/a", "bad/a-2"]
    assert map_file_names(["array:3"]) == ["array_3"]
    assert map_file_names(["/x/one.png"]) == ["one"]


def test_patchcore_from_the_command_line_localises_the_defects(folders, tmp_path, capsys):
    """The same commands with a method of the package (when registered): PatchCore's maps are high on
    the pasted gravel, and every defective image scores higher than every good one."""
    from oodscope.detectors import registered

    if "patchcore" not in registered():
        pytest.skip("patchcore is not registered")
    root, boxes = folders
    model_dir, maps_dir = tmp_path / "patchcore", tmp_path / "maps"
    code, _, err = run_cli(["fit", "--backbone", BACKBONE, "--method", "patchcore", "--id-dir", root / "good",
                            "--alpha", "0.2", "--workers", "0", "--no-cache", "-o", model_dir], capsys)
    assert code == 0, err
    code, out, err = run_cli(["score", model_dir, root / "test", "--maps", maps_dir, "--format", "jsonl",
                              "--workers", "0", "--no-cache"], capsys)
    assert code == 0, err
    scores = {Path(r["item"]).stem: r["score"] for r in map(__import__("json").loads, out.splitlines())}
    for stem, (x0, y0, bw, bh) in boxes.items():
        amap = np.load(maps_dir / "defect" / f"{stem}.npy", allow_pickle=False).astype(np.float64)
        inside = np.zeros(amap.shape, bool)
        inside[y0:y0 + bh, x0:x0 + bw] = True
        assert amap[inside].mean() > amap[~inside].mean(), stem
    bad = [v for s, v in scores.items() if s.startswith("bad")]
    good = [v for s, v in scores.items() if s.startswith("ok")]
    assert min(bad) > max(good)  # measured: 37.9-43.0 against 24.3-26.3


def test_image_level_method_gives_scores_but_refuses_maps(folders):
    """Gaussian AD scores the pooled image (``pixel_maps = False``): its 1 x 1 "map" is not written as a map."""
    root, _ = folders
    model = OODModel(BACKBONE, "gaussian_ad", alpha=0.2, progress=False, num_workers=0).fit(root / "good")
    assert np.isfinite(model.predict(root / "test").scores).all()
    with pytest.raises(ValueError, match="image-level anomaly method"):
        model.score_maps(root / "test")
