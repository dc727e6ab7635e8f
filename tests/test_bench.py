"""Benchmark runner: metrics equal a direct computation, one extraction per backbone, failures
recorded, streaming equals in-memory, timings / environment / outputs present, config files."""

from __future__ import annotations

import csv
import hashlib
import json

import numpy as np
import pytest
from tiny_models import tiny_classifier

from oodscope.backbones.base import Features
from oodscope.backbones.conse import ConSE
from oodscope.detectors import create, registered
from oodscope.detectors.fitting import build_detector, class_needs, fit_detector
from oodscope.evaluation.bench import (
    BenchConfig,
    OODSet,
    load_config,
    load_scores,
    parse_ood_flag,
    run_benchmark,
    spread,
)
from oodscope.evaluation.metrics import ood_metrics
from oodscope.features.extract import extract
from oodscope.io import ArrayDataset

CLASSES = ["ant", "bee", "cat", "dog", "eel"]  # tiny_classifier has 5 outputs


# ----------------------------------------------------------------------------- test doubles
class FakeText:
    """Deterministic unit vectors from a hash of each text (a stand-in text encoder)."""

    id = "fake-text"

    def __init__(self, dim: int = 8) -> None:
        self.dim = dim
        self.calls = 0

    def weights_fingerprint(self) -> str:
        return f"dim{self.dim}"

    def encode_texts(self, texts):
        self.calls += 1
        out = []
        for t in texts:
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:4], "little")
            v = np.random.default_rng(seed).normal(size=self.dim)
            out.append(v / np.linalg.norm(v))
        return np.asarray(out, dtype=np.float32)


class Counting:
    """Wraps a backbone and counts the images it encodes."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.images = 0
        self.id = inner.id
        self.input_spec = inner.input_spec
        self.device = inner.device

    def weights_fingerprint(self) -> str:
        return self.inner.weights_fingerprint()

    def encode_images(self, batch):
        self.images += len(batch)
        return self.inner.encode_images(batch)

    def classifier_parts(self):
        return self.inner.classifier_parts()


class FakeVLM(Counting):
    """A TorchClassifier plus a text encoder: embedding = normalized penultimate (8-dim)."""

    def __init__(self, inner, text=None) -> None:
        super().__init__(inner)
        self.id = "fake-vlm"
        self.text = text or FakeText(8)

    def encode_images(self, batch):
        f = super().encode_images(batch)
        e = f.penultimate / np.linalg.norm(f.penultimate, axis=1, keepdims=True)
        return Features(embedding=e.astype(np.float32), backbone_id=self.id)

    def encode_texts(self, texts):
        return self.text.encode_texts(texts)


def make_data(n: int, lo: int, hi: int, labeled: bool, name: str, seed: int) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    images = rng.integers(lo, hi, size=(n, 12, 12, 3)).astype(np.uint8)
    if not labeled:
        return ArrayDataset(images, name=name)
    return ArrayDataset(images, np.arange(n) % len(CLASSES), CLASSES, name=name)


@pytest.fixture(scope="module")
def data():
    return {
        "id": make_data(30, 0, 140, True, "id", 1),
        "id_fit": make_data(40, 0, 140, True, "fit", 2),
        "near_a": make_data(20, 60, 220, False, "near", 3),
        "far_b": make_data(25, 140, 256, False, "far", 4),
    }


def config(data, backbones, detectors, out, **extra) -> BenchConfig:
    return BenchConfig(
        backbones=backbones, detectors=detectors, id=data["id"], id_fit=data["id_fit"],
        ood=[OODSet("near_a", data["near_a"], "near"), OODSet("far_b", data["far_b"], "far")],
        output=out, progress=False, num_workers=0, batch_size=16, report=False, **extra)


DETECTORS = ["msp", "energy", "mahalanobis", "knn", "mcm", "linear_probe"]


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    clf = Counting(tiny_classifier(0))
    vlm = FakeVLM(tiny_classifier(1))
    cfg = config(data, [clf, vlm], DETECTORS + ["weighted_energy"], out,
                 detector_params={"knn": {"k": 3}})
    return run_benchmark(cfg), clf, vlm, out


# ----------------------------------------------------------------------------- metrics = direct computation
def test_metrics_equal_a_direct_computation(run, data):
    result, clf, vlm, _ = run
    for backbone in (clf, vlm):
        feats = {k: extract(backbone.inner if backbone is clf else backbone, v, progress=False, num_workers=0)
                 for k, v in data.items()}
        for name in DETECTORS:
            cls = registered()[name]
            if backbone is clf and class_needs(cls).text_encoder:
                continue
            if backbone is vlm and "logits" in cls.requires:
                continue
            det = build_detector(name, {"k": 3} if name == "knn" else {}, CLASSES)
            fit_detector(det, feats["id_fit"].features, feats["id_fit"].labels, text_encoder=backbone)
            direct = {k: det.score(feats[k].features) for k in ("id", "near_a", "far_b")}
            saved = result.load_scores(backbone.id, name)
            np.testing.assert_allclose(saved["id"], direct["id"], rtol=1e-6, atol=1e-9)
            for s in ("near_a", "far_b"):
                np.testing.assert_allclose(saved[s], direct[s], rtol=1e-6, atol=1e-9)
                expected = ood_metrics(saved["id"], saved[s])
                for metric in ("auroc", "fpr95", "aupr_in", "aupr_out"):
                    assert result.metric(backbone.id, name, s, metric) == pytest.approx(expected[metric], abs=0)
            near = result.metric(backbone.id, name, "near-average")
            assert near == pytest.approx(result.metric(backbone.id, name, "near_a"))
            both = np.mean([result.metric(backbone.id, name, s) for s in ("near_a", "far_b")])
            assert result.metric(backbone.id, name, "all-average") == pytest.approx(both)


def test_every_applicable_pair_has_rows_and_the_rest_is_recorded(run):
    result, clf, vlm, _ = run
    ran = {(r["backbone"], r["detector"]) for r in result.rows}
    failed = {(f["backbone"], f["detector"]): f for f in result.failures}
    assert {("tiny-cnn-0", d) for d in ("msp", "energy", "mahalanobis", "knn", "linear_probe")} <= ran
    assert {("fake-vlm", d) for d in ("mahalanobis", "knn", "mcm", "linear_probe")} <= ran
    # Zero-shot method on a classifier without text encoder; logit method on a VLM without logits;
    # a detector with a required parameter: recorded with a reason, never fatal.
    assert "text encoder" in failed[("tiny-cnn-0", "mcm")]["reason"]
    assert "logits" in failed[("fake-vlm", "msp")]["reason"]
    assert "class_weights" in failed[("tiny-cnn-0", "weighted_energy")]["reason"]
    assert not ran & set(failed)


def test_extraction_runs_once_per_backbone_and_is_shared_with_conse(data, tmp_path):
    base = Counting(tiny_classifier(2))
    text = FakeText(16)
    conse = ConSE(base, text, top_t=3)
    result = run_benchmark(config(data, [base, conse], ["msp", "mcm"], tmp_path))
    total = sum(len(v) for v in data.values())
    assert base.images == total  # the classifier ran once over every image; ConSE reused its features
    assert {(r["backbone"], r["detector"]) for r in result.rows} >= {(base.id, "msp"), (conse.id, "mcm"),
                                                                     (conse.id, "msp")}
    # ConSE's scores are those of its features derived from the cached classifier features.
    direct = conse.from_classifier_features(extract(base.inner, data["id"], progress=False, num_workers=0).features)
    det = create("mcm", classes=CLASSES).fit(text_encoder=conse)
    np.testing.assert_allclose(result.load_scores(conse.id, "mcm")["id"], det.score(direct), rtol=1e-6)
    assert result.seconds("extract", backbone=conse.id) == 0.0  # nothing extracted for the derived backbone
    assert result.seconds("derive", backbone=conse.id) > 0.0


def test_failures_at_create_fit_and_score_are_recorded_not_fatal(data, tmp_path, monkeypatch):
    def broken(self, inputs):
        raise RuntimeError("boom")

    monkeypatch.setattr(registered()["max_logit"], "_score", broken)
    cfg = config(data, [tiny_classifier(0)], ["msp", "max_logit", "energy", "knn"], tmp_path,
                 detector_params={"energy": {"temperature": -1.0}, "knn": {"k": 1000}})
    result = run_benchmark(cfg)
    stages = {f["detector"]: f for f in result.failures}
    assert stages["max_logit"]["stage"].startswith("score") and "boom" in stages["max_logit"]["reason"]
    assert stages["energy"]["stage"] == "create"
    assert stages["knn"]["stage"] in ("fit", "score (id)")
    assert {r["detector"] for r in result.rows} == {"msp"}
    with open(tmp_path / "failures.csv") as fh:
        assert {row["detector"] for row in csv.DictReader(fh)} == {"max_logit", "energy", "knn"}


# ----------------------------------------------------------------------------- accuracy, timing, outputs
def test_id_accuracy_sources(run, data):
    result, clf, vlm, _ = run
    rows = {(r["backbone"], r["detector"]): r for r in result.rows if r["set"] == "near_a"}
    feats = extract(vlm, data["id"], progress=False, num_workers=0).features
    det = create("mcm", classes=CLASSES).fit(text_encoder=vlm)
    cos = feats.embedding @ det.state_["class_text"].numpy().T
    expected = float(np.mean(cos.argmax(1) == data["id"].labels))
    assert rows[("fake-vlm", "mcm")]["id_accuracy"] == pytest.approx(expected)
    assert rows[("fake-vlm", "mcm")]["id_accuracy_source"].startswith("zero-shot")
    # tiny classifier: 5 unnamed outputs = the 5 ID classes -> its own logits.
    clf_feats = extract(clf.inner, data["id"], progress=False, num_workers=0).features
    acc = float(np.mean(clf_feats.logits.argmax(1) == data["id"].labels))
    assert rows[("tiny-cnn-0", "msp")]["id_accuracy"] == pytest.approx(acc)
    assert rows[("tiny-cnn-0", "msp")]["id_accuracy_source"].startswith("classifier logits")
    # Backbone without logits: a linear probe fitted on the ID fit set.
    assert rows[("fake-vlm", "knn")]["id_accuracy_source"].startswith("linear probe")
    assert 0.0 <= rows[("fake-vlm", "knn")]["id_accuracy"] <= 1.0


def test_timings_environment_and_files(run):
    result, _, _, out = run
    for backbone in ("tiny-cnn-0", "fake-vlm"):
        stages = {t["stage"] for t in result.timings if t["backbone"] == backbone}
        assert {"extract", "fit", "score"} <= stages
        assert result.seconds("extract", backbone) > 0
        scored = [t for t in result.timings if t["backbone"] == backbone and t["stage"] == "score"]
        assert scored and all(t["cpu_seconds"] is not None and t["cpu_seconds"] >= 0 for t in scored)
    payload = json.loads((out / "results.json").read_text())
    assert payload["format"] == "oodscope-bench"
    env = payload["environment"]
    for key in ("python", "torch", "oodscope", "cpu_count", "date"):
        assert env[key]
    assert payload["datasets"]["near_a"]["kind"] == "near" and payload["datasets"]["id"]["images"] == 30
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(result.rows) and {"auroc", "fpr95", "aupr_in", "aupr_out"} <= set(rows[0])
    md = (out / "results.md").read_text()
    assert "## tiny-cnn-0" in md and "weighted_energy" in md
    for files in payload["scores"].values():
        for rel in files.values():
            scores = load_scores(out / rel)
            assert set(scores) == {"id", "near_a", "far_b"} and scores["id"].dtype == np.float64


def test_streaming_equals_in_memory(data, tmp_path):
    clf = tiny_classifier(0)
    dets = ["msp", "mahalanobis", "knn"]
    a = run_benchmark(config(data, [clf], dets, tmp_path / "mem", detector_params={"knn": {"k": 3}}))
    b = run_benchmark(config(data, [clf], dets, tmp_path / "stream", detector_params={"knn": {"k": 3}},
                             stream=True, stream_batch=7, cache_dir=tmp_path / "cache"))
    for det in dets:
        sa, sb = a.load_scores(clf.id, det), b.load_scores(clf.id, det)
        for k in sa:
            np.testing.assert_allclose(sa[k], sb[k], rtol=1e-6, atol=1e-9)
    assert [r["auroc"] for r in a.rows] == pytest.approx([r["auroc"] for r in b.rows])


def test_model_based_detector_scores_images(data, tmp_path):
    clf = tiny_classifier(0)
    cfg = config(data, [clf], ["gradnorm"], tmp_path, model_based=True, limit=10)
    result = run_benchmark(cfg)
    scores = result.load_scores(clf.id, "gradnorm")
    from oodscope.backbones.preprocess import preprocess
    from oodscope.evaluation.bench import spread as pick

    rows = pick(len(data["near_a"]), 10)
    images = preprocess([data["near_a"].load(int(i)) for i in rows], clf.input_spec)
    direct = create("gradnorm").score_images(clf.classifier_parts(), images)
    np.testing.assert_allclose(scores["near_a"], direct, rtol=1e-5)


# ----------------------------------------------------------------------------- config parsing
def test_spread_limit_and_ood_flags():
    assert spread(10, None).tolist() == list(range(10))
    assert spread(10, 3).tolist() == [0, 4, 9]
    assert spread(5, 50).tolist() == list(range(5))
    assert parse_ood_flag("near:cifar=/data/c") == OODSet("cifar", "/data/c", "near")
    assert parse_ood_flag("svhn=/x") == OODSet("svhn", "/x", None)
    assert parse_ood_flag("digits") == OODSet("digits", "digits", None)
    with pytest.raises(ValueError):
        parse_ood_flag("far:=x")


TOML = """
backbones = ["effnet-lite0", "conse:effnet-lite0"]
detectors = ["msp", "energy", "mcm"]
id = "fashion-mnist-ood/id"
id_fit = "fashion-mnist-ood/id-fit"
limit = 200
stream = true
ood = ["near:fashion_near=fashion-mnist-ood/near", {name = "digits", data = "digits", kind = "far"}]

[detector_params.knn]
k = 50
"""


def test_toml_and_yaml_configs(tmp_path):
    path = tmp_path / "bench.toml"
    path.write_text(TOML)
    cfg = load_config(path)
    assert cfg.backbones == ["effnet-lite0", "conse:effnet-lite0"] and cfg.limit == 200 and cfg.stream
    assert cfg.ood == [OODSet("fashion_near", "fashion-mnist-ood/near", "near"), OODSet("digits", "digits", "far")]
    assert cfg.detector_params == {"knn": {"k": 50}}
    yaml = pytest.importorskip("yaml")
    ypath = tmp_path / "bench.yaml"
    ypath.write_text(yaml.safe_dump({"backbones": "effnet-lite0", "id": "digits", "ood": ["far:t=textiles"]}))
    ycfg = load_config(ypath)
    assert ycfg.backbones == ["effnet-lite0"] and ycfg.ood == [OODSet("t", "textiles", "far")]
    bad = tmp_path / "bad.toml"
    bad.write_text('colour = "blue"\n')
    with pytest.raises(ValueError, match="unknown configuration keys"):
        load_config(bad)


def test_cli_flags_override_a_config_file(tmp_path):
    from oodscope.cli.commands.bench import build_config
    from oodscope.cli.main import build_parser

    path = tmp_path / "bench.toml"
    path.write_text(TOML)
    args = build_parser().parse_args([
        "bench", "--config", str(path), "--backbone", "effnet-lite1", "--detectors", "knn,vim",
        "--ood", "far:tex=textiles", "--limit", "50", "--classes", "a,b", "-o", str(tmp_path / "o")])
    cfg = build_config(args)
    assert cfg.backbones == ["effnet-lite0", "conse:effnet-lite0", "effnet-lite1"]
    assert cfg.detectors == "knn,vim" and cfg.limit == 50 and cfg.classes == ["a", "b"]
    assert cfg.ood[-1] == OODSet("tex", "textiles", "far") and len(cfg.ood) == 3
    assert cfg.cache_dir is not None  # the CLI always caches features


def test_benchmark_expands_to_its_sets():
    from oodscope.evaluation.bench import _plan_sets

    pytest.importorskip("conformal_clip_data")
    try:
        sets, classes = _plan_sets(BenchConfig(benchmark="fashion-mnist-ood", limit=20))
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST files are not installed")
    assert list(sets) == ["id", "id_fit", "fashion_near", "digits", "textiles"]
    assert [sets[k].kind for k in ("fashion_near", "digits", "textiles")] == ["near", "far", "far"]
    assert all(len(s.source) == 20 for s in sets.values())
    assert classes == ["T-shirt/top", "Trouser", "Dress", "Sandal", "Sneaker", "Bag"]


# ----------------------------------------------------------------------------- results.md
def test_fit_time_cautions_reach_the_results_note(data, tmp_path):
    clf = tiny_classifier(0)
    # 10 fit images, 5 classes, 8-d features: the tied covariance cannot be full rank.
    from oodscope.detectors.base import FitWarning

    with pytest.warns(FitWarning, match="covariance is singular") as caught:
        result = run_benchmark(config(data, [clf], ["mahalanobis", "msp"], tmp_path, fit_limit=10))
    assert caught[0].filename.endswith("bench_run.py")  # points at the caller of fit(), not at detector internals
    notes = {r["detector"]: r["note"] for r in result.rows}
    assert "covariance is singular" in notes["mahalanobis"] and notes["msp"] == ""
    assert "covariance is singular" in (tmp_path / "results.md").read_text()


def _row(backbone, detector, set_name, auroc, kind="far"):
    return {"backbone": backbone, "detector": detector, "set": set_name, "kind": kind, "auroc": auroc,
            "fpr95": 1 - auroc, "aupr_in": auroc, "aupr_out": auroc, "detection_error": 0.1, "n_id": 10,
            "n_ood": 10, "id_accuracy": 0.9, "id_accuracy_source": "", "fit_s": 0.0, "score_s": 0.0, "note": ""}


def test_markdown_ranks_detectors_and_folds_rows_repeated_by_a_derived_backbone():
    from oodscope.evaluation.bench import markdown

    rows = []
    for det, (a, b) in {"msp": (0.6, 0.7), "knn": (0.9, 0.8), "vim": (0.7, 0.9)}.items():
        for backbone in ("clf", "clf-derived"):
            rows += [_row(backbone, det, "a", a), _row(backbone, det, "b", b),
                     _row(backbone, det, "all-average", (a + b) / 2, "average")]
    rows += [_row("clf-derived", "mcm", "a", 0.95), _row("clf-derived", "mcm", "b", 0.5),
             _row("clf-derived", "mcm", "all-average", 0.725, "average")]
    rows = [r | {"auroc": r["auroc"] - 0.05} if (r["backbone"], r["detector"]) == ("clf-derived", "vim") else r
            for r in rows]
    payload = {"results": rows, "failures": [], "timings": [],
               "environment": {k: "x" for k in ("date", "oodscope", "python", "torch", "cpu_count")},
               "datasets": {"id": {"role": "id", "data": "i", "images": 10},
                            "a": {"role": "ood", "data": "a", "images": 10, "kind": "far"},
                            "b": {"role": "ood", "data": "b", "images": 10, "kind": "far"}}}
    md = markdown(payload)
    first, second = md.split("## clf-derived")
    table = [line.split(" | ")[0].strip("| ") for line in first.splitlines() if line.startswith("| ")]
    assert table[1:] == ["knn", "vim", "msp"]  # all-average AUROC 0.85, 0.80, 0.65
    second = second.split("## Time per stage")[0]
    derived = [line.split(" | ")[0].strip("| ") for line in second.splitlines() if line.startswith("| ")]
    assert derived[1:] == ["vim", "mcm"]  # vim differs there; knn and msp repeat the classifier's rows
    assert "Same metrics on every set as on `clf` (not repeated): `knn`, `msp`." in second


def test_detectors_can_be_chosen_per_backbone(data, tmp_path):
    clf, vlm = tiny_classifier(0), FakeVLM(tiny_classifier(1))
    per_backbone = {clf.id: ["msp", "energy"], vlm.id: "mcm"}
    result = run_benchmark(config(data, [clf, vlm], per_backbone, tmp_path))
    ran = {(r["backbone"], r["detector"]) for r in result.rows}
    assert ran == {(clf.id, "msp"), (clf.id, "energy"), (vlm.id, "mcm")} and not result.failures
    with pytest.raises(ValueError, match="no detectors given for 'fake-vlm'"):
        run_benchmark(config(data, [clf, vlm], {clf.id: ["msp"]}, tmp_path / "x"))
    with pytest.raises(ValueError, match="no backbone named 'other'"):
        run_benchmark(config(data, [clf], {clf.id: ["msp"], "other": ["msp"]}, tmp_path / "y"))


def test_the_leaderboard_configs_are_valid():
    from pathlib import Path

    cfg = load_config(Path(__file__).parents[1] / "benchmarks" / "configs" / "fashion-mnist-ood.toml")
    assert cfg.benchmark == "fashion-mnist-ood" and cfg.detectors == "all" and cfg.fit_limit == 6000
    create("score_ensemble", **cfg.detector_params["score_ensemble"])
    create("eoe", classes=["T-shirt/top", "Trouser"], **cfg.detector_params["eoe"])
    layers = load_config(Path(__file__).parents[1] / "benchmarks" / "configs" / "fashion-mnist-ood-layers.toml")
    assert layers.backbone_options == {"effnet-lite0": {"layers": True}}
    for name in layers.detectors:
        create(name)
    model = load_config(Path(__file__).parents[1] / "benchmarks" / "configs" / "fashion-mnist-ood-model.toml")
    assert model.model_based and model.backbone_options == {"effnet-lite0?dense": {"layers": True}}
    assert all(class_needs(name).model for name in model.detectors if name not in ("mahalanobis", "gram"))


def test_test_time_adaptive_detectors_get_one_fresh_stream_per_ood_set(data, tmp_path):
    """As AdaNeg's official evaluator: reset() per OOD set, one seeded shuffled ID+OOD stream, the ID
    scores of each pair taken from its own stream (no memory carried from one OOD set to the next)."""
    from oodscope.evaluation.streams import ADAPTIVE_PROTOCOL_NOTE, DEFAULT_STREAM_SEED, adaptive_pair_scores

    vlm = FakeVLM(tiny_classifier(1))
    params = {"adaneg": {"negatives": [f"word{i}" for i in range(12)], "ngroups": 3, "batch_size": 8,
                         "temperature": 0.05}}
    result = run_benchmark(config(data, [vlm], ["adaneg", "mcm"], tmp_path, detector_params=params))
    feats = {k: extract(vlm, v, progress=False, num_workers=0).features for k, v in data.items()}
    det = build_detector("adaneg", params["adaneg"], CLASSES)
    fit_detector(det, None, None, text_encoder=vlm)
    saved = result.load_scores(vlm.id, "adaneg")
    for s in ("near_a", "far_b"):
        det.score(feats["near_a"].subset(slice(0, 9)))  # whatever came before is forgotten
        s_id, s_ood = adaptive_pair_scores(det, feats["id"], feats[s], DEFAULT_STREAM_SEED)
        np.testing.assert_allclose(saved[f"id@{s}"], s_id, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(saved[s], s_ood, rtol=1e-6, atol=1e-9)
        expected = ood_metrics(s_id, s_ood)
        assert result.metric(vlm.id, "adaneg", s) == pytest.approx(expected["auroc"], abs=1e-12)
    assert not np.allclose(saved["id@near_a"], saved["id@far_b"])  # each pair its own stream
    rows = [r for r in result.rows if r["detector"] == "adaneg"]
    assert rows and all(ADAPTIVE_PROTOCOL_NOTE in r["note"] for r in rows)
    assert all(ADAPTIVE_PROTOCOL_NOTE not in r["note"] for r in result.rows if r["detector"] == "mcm")
    assert det.memory_counts  # the streams did reach the memory
