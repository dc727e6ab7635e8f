"""The benchmark's anomaly mode end to end on a tiny synthetic category, its report section, the demo's
anomaly part."""

from __future__ import annotations

import csv
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from oodscope.cli.main import main
from oodscope.evaluation.bench_anomaly import anomaly_categories_of, eval_size

pytest.importorskip("efficientnet_lite_pytorch")
BACKBONE = "effnet-lite0@64"  # tiny input: the dense maps are 8 x 8 (stage3) and 4 x 4 (stage5)


@pytest.fixture(scope="module")
def category(tmp_path_factory) -> Path:
    pytest.importorskip("skimage")
    from oodscope.io.synthetic_benchmark import build_synthetic_mvtec

    root = build_synthetic_mvtec(tmp_path_factory.mktemp("ad"), ["brick"], n_train=10, n_test_good=4, n_per_kind=2,
                                 size=64)
    return root / "brick"


@pytest.fixture(scope="module")
def bench(category, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "run"
    cache = tmp_path_factory.mktemp("cache")
    rc = main(["bench", "--anomaly", str(category), "--backbone", BACKBONE,
               "--detectors", "patchcore,padim,gaussian_ad,msp", "--anomaly-gallery", "2",
               "--cache", str(cache), "-o", str(out), "--quiet"])
    return out, rc


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "results.csv", newline="") as fh:
        return {r["detector"]: r for r in csv.DictReader(fh)}


def test_bench_anomaly_mode_table_metrics_and_files(bench):
    out, rc = bench
    assert rc == 3  # msp is not an anomaly detector: recorded as not run, the others ran
    rows = _rows(out)
    assert set(rows) == {"patchcore", "padim", "gaussian_ad"}
    for name in ("patchcore", "padim"):
        r = rows[name]
        assert (r["category"], r["n_train"], r["n_test"], r["n_defective"]) == ("brick", "10", "12", "8")
        assert 0.5 < float(r["pixel_auroc"]) <= 1.0  # the maps are higher on the pasted defects
        assert 0.0 <= float(r["aupro"]) <= 1.0
    # image-level method: pixel columns empty and said why
    assert rows["gaussian_ad"]["pixel_auroc"] == "" and rows["gaussian_ad"]["aupro"] == ""
    assert "image-level" in rows["gaussian_ad"]["note"]
    payload = json.loads((out / "results.json").read_text())
    assert payload["mode"] == "anomaly"
    assert [f["detector"] for f in payload["failures"] if f["detector"] == "msp"] == ["msp"]
    # image AUROC against scikit-learn on the saved scores and labels
    from safetensors.numpy import load_file
    from sklearn.metrics import roc_auc_score

    saved = load_file(str(out / payload["scores"][BACKBONE]["patchcore"]))
    labels, scores = saved["brick.labels"], saved["brick"]
    assert labels.tolist() == [0] * 4 + [1] * 8  # test/good first, then the defect folders
    assert float(rows["patchcore"]["image_auroc"]) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    # the gallery holds the 2 highest and 2 lowest scores, with overlays and masks
    shown = [g for g in payload["gallery"] if g["detector"] == "patchcore"]
    order = np.argsort(-scores, kind="stable")
    assert [g["score"] for g in shown if g["which"] == "highest"] == pytest.approx(scores[order[:2]].tolist())
    assert [g["score"] for g in shown if g["which"] == "lowest"] == pytest.approx(scores[order[::-1][:2]].tolist())
    for g in shown:
        for key in ("image", "overlay", "mask"):
            assert (out / g[key]).is_file()
    assert all(g["overlay"] is None and g["mask"] is not None for g in payload["gallery"]
               if g["detector"] == "gaussian_ad")  # no maps to show for an image-level method
    md = (out / "results.md").read_text()
    assert f"## {BACKBONE}: pixel AUROC" in md and "| patchcore |" in md and "## Not run" in md


def test_report_has_the_anomaly_tables_and_gallery(bench):
    out, _ = bench
    html = (out / "report.html").read_text()
    HTMLParser().feed(html)
    assert "<h2 id='anomaly'>Anomaly detection</h2>" in html
    for label in ("image AUROC", "pixel AUROC", "AUPRO"):
        assert f"{BACKBONE}: {label}</h3>" in html
    assert "Gallery: highest- and lowest-scoring test images" in html
    payload = json.loads((out / "results.json").read_text())
    n_png = sum(1 for g in payload["gallery"] for k in ("image", "overlay", "mask") if g[k])
    assert html.count("data:image/png;base64,") == n_png  # every gallery picture embedded
    assert "gaussian_ad is image-level" in html


def test_category_entries_and_eval_size(category):
    with pytest.raises(ValueError, match="listed twice"):  # the folder is named brick too
        anomaly_categories_of(["synthetic-ad", str(category)])
    cats = anomaly_categories_of(["synthetic-ad", "textiles-ad/local"]) + anomaly_categories_of([str(category)])
    assert [c.name for c in cats] == ["brick", "grass", "gravel", "textile", "textiles-local", "brick"]
    assert cats[4].test == "textiles-ad/test-local"
    with pytest.raises(ValueError, match="synthetic-ad has brick"):
        anomaly_categories_of(["synthetic-ad/marble"])
    with pytest.raises(ValueError, match="not a family"):
        anomaly_categories_of(["no/such/folder"])
    assert eval_size((1024, 768), 256) == (256, 192)
    assert eval_size((128, 64), 256) == (128, 64)


@pytest.mark.slow
def test_demo_anomaly_part_runs(tmp_path, monkeypatch):
    pytest.importorskip("skimage")
    from oodscope.cli.demo_anomaly import run_anomaly_demo

    monkeypatch.setenv("OODSCOPE_DATA", str(tmp_path / "data"))  # synthetic-ad is built here on first use
    part = run_anomaly_demo(tmp_path / "anomaly", cache_dir=tmp_path / "cache", backbone=BACKBONE, limit=12,
                            gallery=1, progress=False)
    assert "| patchcore |" in part.table and "## Not run" not in part.table
    assert "pixel AUROC" in part.html and part.html.count("data:image/png;base64,") == 6  # 2 x image/overlay/mask


def test_text_methods_get_the_backbone_as_text_encoder_and_the_object_name(category, tmp_path):
    """WinCLIP+ on the packaged ConSE backbone's patch grid (4 x 4 at 128 px): fitted with the backbone as
    its text encoder, its state prompts naming the category's object ("brick")."""
    from oodscope.evaluation.bench_anomaly import object_name

    assert [object_name(c) for c in ("synthetic-ad/brick", "mvtec-ad/metal_nut", "textiles-ad")] == [
        "brick", "metal nut", "textiles"]
    out = tmp_path / "run"
    rc = main(["bench", "--anomaly", str(category), "--backbone", "conse:effnet-lite0@128?dense=conse",
               "--detectors", "winclip", "--params", '{"winclip": {"k_shot": 2}}', "--anomaly-gallery", "0",
               "--cache", str(tmp_path / "cache"), "-o", str(out), "--quiet"])
    assert rc == 0, (out / "failures.csv").read_text() if (out / "failures.csv").exists() else rc
    row = _rows(out)["winclip"]
    assert 0.0 <= float(row["image_auroc"]) <= 1.0 and float(row["pixel_auroc"]) > 0.0
    params = json.loads((out / "results.json").read_text())
    assert "brick" in json.dumps(params)


def test_image_trained_methods_run_on_the_images(category, tmp_path):
    """EfficientAD trains on the images themselves: the anomaly mode feeds it the [0, 1] pixels at its own
    size and scores its maps like every other method's."""
    out = tmp_path / "run"
    rc = main(["bench", "--anomaly", str(category), "--backbone", BACKBONE, "--detectors", "efficientad",
               "--params", '{"efficientad": {"image_size": 64, "steps": 2}}', "--anomaly-gallery", "0",
               "--cache", str(tmp_path / "cache"), "-o", str(out), "--quiet"])
    assert rc == 0, (out / "failures.csv").read_text() if (out / "failures.csv").exists() else rc
    row = _rows(out)["efficientad"]
    assert 0.0 <= float(row["image_auroc"]) <= 1.0 and 0.0 < float(row["pixel_auroc"]) <= 1.0
    assert float(row["aupro"]) >= 0.0 and int(row["n_test"]) == 4 + 4 * 2  # 4 good + 2 of each of 4 kinds
