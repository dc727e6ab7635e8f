"""Named hyper-parameter presets (``oodscope.detectors.presets``): values per preset as the official
sources give them, explicit parameters over the preset, a source for every value, only real
parameters of registered detectors, the name recorded through save -> load (and files written before
presets still load), ``fit --preset`` / ``bench --preset`` end to end on tiny data, unknown names refused.

The expected values below were written from the official files (not from the table):
``deeplearning-wisc/dice`` ``demo-imagenet.sh`` (``--p 70``) / ``demo-cifar.sh`` (``--p 90``);
``andrijazz/ash`` ``ash.py`` (``ash_b``/``ash_p`` ``percentile=65``), ``config/imagenet_config.yml``
(``ash_s@90``), ``config/cifar10_config.yml`` (``ash_s@95``); ``deeplearning-wisc/knn-ood``
``run_imagenet.py`` (``K = 1000``, ``ALPHA = 1.00``) / ``run_cifar.py`` (``K = 50``);
``roomo7time/nnguide`` ``configs/detector/nnguide.yaml`` (``knn_k: 10``) and ``bankset_ratio=0.01``;
``AtsuMiyai/GL-MCM`` ``scripts/eval_imagenet.sh`` (``--lambda_local 0.5``); OpenOOD v1.5
``configs/postprocessors/{dice,ash,knn,nnguide,react,scale,vim,odin}.yml``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
from pathlib import Path

import numpy as np
import pytest
import tiny_cli

from oodscope.cli.main import build_parser, main
from oodscope.detectors import DetectorError, create, load, registered
from oodscope.detectors.base import parameters
from oodscope.detectors.presets import GAPS, NOT_SET, PRESET_NAMES, PRESETS, preset_rows, resolve_params

CNN = tiny_cli.TINY_CLASSIFIER
CLASSES = ["cat", "dog", "car"]

#: (preset, detector) -> the parameters the official sources give (see the module docstring).
EXPECTED = {
    ("paper-imagenet", "dice"): {"p": 70.0},
    ("paper-imagenet", "ash_p"): {"percentile": 65.0},
    ("paper-imagenet", "ash_b"): {"percentile": 65.0},
    ("paper-imagenet", "ash_s"): {"percentile": 90.0},
    ("paper-imagenet", "knn"): {"k": 1000, "subsample": 1.0},
    ("paper-imagenet", "nnguide"): {"k": 10, "subsample": 0.01},
    ("paper-imagenet", "react"): {"percentile": 90.0},
    ("paper-imagenet", "scale"): {"percentile": 85.0},
    ("paper-imagenet", "she"): {"correct_only": True},
    ("paper-imagenet", "glmcm"): {"local_weight": 0.5},
    ("paper-cifar", "dice"): {"p": 90.0},
    ("paper-cifar", "ash_s"): {"percentile": 95.0},
    ("paper-cifar", "knn"): {"k": 50, "subsample": 1.0},
    ("paper-cifar", "react"): {"percentile": 90.0},
    ("paper-cifar", "scale"): {"percentile": 85.0},
    ("paper-cifar", "she"): {"correct_only": True},
    ("openood-v1.5", "dice"): {"p": 90.0},
    ("openood-v1.5", "ash_b"): {"percentile": 90.0},
    ("openood-v1.5", "knn"): {"k": 50, "subsample": 1.0},
    ("openood-v1.5", "nnguide"): {"k": 100, "subsample": 0.01},
    ("openood-v1.5", "react"): {"percentile": 90.0},
    ("openood-v1.5", "scale"): {"percentile": 85.0},
    ("openood-v1.5", "vim"): {"dim": 256},
    ("openood-v1.5", "she"): {"correct_only": True},
    ("openood-v1.5", "odin"): {"temperature": 1000.0, "epsilon": 0.0014},
}


def _required(name: str) -> dict:
    """What a detector needs besides its preset to be created (class names for the zero-shot kinds)."""
    return {"classes": CLASSES} if "classes" in parameters(registered()[name]) else {}


# ------------------------------------------------------------------------------ the table
def test_the_table_is_exactly_what_the_sources_give():
    table = {(p, d): {k: s.value for k, s in settings.items()}
             for p, preset in PRESETS.items() for d, settings in preset.detectors.items()}
    assert table == EXPECTED
    assert PRESET_NAMES == ("paper-imagenet", "paper-cifar", "openood-v1.5")


@pytest.mark.parametrize(("preset", "name"), sorted(EXPECTED))
def test_create_resolves_the_preset(preset, name):
    detector = create(name, preset=preset, **_required(name))
    params = detector.get_params()
    for key, value in EXPECTED[preset, name].items():
        assert params[key] == value and type(params[key]) is type(value), (key, params[key])
    # every other parameter keeps the class default
    defaults = {k: v for k, v in parameters(type(detector)).items() if v is not inspect.Parameter.empty}
    assert {k: v for k, v in params.items() if k not in EXPECTED[preset, name] and k in defaults} == \
        {k: v for k, v in defaults.items() if k not in EXPECTED[preset, name]}
    assert detector.preset_ == preset


def test_a_detector_absent_from_a_preset_keeps_its_defaults():
    for preset in PRESET_NAMES:
        for name in ("msp", "energy", "mahalanobis"):
            assert create(name, preset=preset).get_params() == create(name).get_params()
    assert create("vim", preset="paper-imagenet").dim is None  # the official width rule (NOT_SET says so)
    assert create("ash_p", preset="openood-v1.5").percentile == create("ash_p").percentile
    assert create("dice").preset_ is None


def test_explicit_parameters_override_the_preset():
    assert create("dice", preset="paper-imagenet", p=50.0).p == 50.0
    knn = create("knn", preset="paper-imagenet", k=5)
    assert (knn.k, knn.subsample) == (5, 1.0)  # k explicit, subsample from the preset
    nng = create("nnguide", preset="openood-v1.5", subsample=1.0)
    assert (nng.k, nng.subsample) == (100, 1.0)
    assert create("glmcm", classes=CLASSES, preset="paper-imagenet", local_weight=1.0).lambda_ == 1.0
    assert resolve_params("dice", None, {"p": 3.0}) == {"p": 3.0}
    assert resolve_params("dice", "paper-cifar", {}) == {"p": 90.0}


def test_every_value_names_its_source():
    # "owner/repo <file>": a repository and a file in it (a script, a config or a module).
    source = re.compile(r"\b[\w-]+/[\w.-]+ .*?[\w/.-]+\.(?:py|sh|yml|yaml)\b")
    rows = preset_rows()
    assert len(rows) == sum(len(v) for v in EXPECTED.values())
    for row in rows:
        assert source.search(row["source"]), row
    # a value from a file names the value as it is written there
    assert "--p 70" in PRESETS["paper-imagenet"].detectors["dice"]["p"].source
    assert "knn.yml: K: 50" in PRESETS["openood-v1.5"].detectors["knn"]["k"].source


def test_every_preset_parameter_is_a_real_parameter():
    """So the table cannot rot: a renamed parameter or detector fails here."""
    detectors = registered()
    for row in preset_rows():
        assert row["detector"] in detectors, row
        assert row["parameter"] in parameters(detectors[row["detector"]]), row
    for preset, name in [*NOT_SET, *GAPS]:
        assert preset in PRESETS and name in detectors
    for preset, name in NOT_SET:  # "not set" really means absent
        assert name not in PRESETS[preset].detectors


def test_an_unknown_preset_is_refused_with_the_valid_ones():
    from oodscope.evaluation.bench_config import BenchConfig
    from oodscope.pipeline import OODModel, OODModelError

    with pytest.raises(DetectorError, match="unknown preset 'imagenet'; presets: paper-imagenet, paper-cifar, "
                                            "openood-v1.5"):
        create("dice", preset="imagenet")
    with pytest.raises(DetectorError, match="unknown preset"):
        create("msp", preset="nope")  # refused even where the detector would take nothing from it
    with pytest.raises(OODModelError, match="presets: paper-imagenet"):
        OODModel("effnet-lite0", "dice", preset="imagenet")
    with pytest.raises(ValueError, match="presets: paper-imagenet"):
        BenchConfig(preset="imagenet")


# ------------------------------------------------------------------------------ persistence
def _features(n: int = 40, d: int = 6, c: int = 3, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    h = np.abs(rng.normal(size=(n, d))).astype(np.float32)
    w = rng.normal(size=(c, d)).astype(np.float32)
    b = rng.normal(size=c).astype(np.float32)
    return {"penultimate": h, "weight": w, "bias": b, "logits": h @ w.T + b, "embedding": h}


def test_save_load_keeps_the_preset_and_the_resolved_parameters(tmp_path):
    feats = _features()
    det = create("dice", preset="paper-imagenet").fit(feats)
    det.save(tmp_path / "d")
    saved = json.loads((tmp_path / "d" / "detector.json").read_text())
    assert saved["preset"] == "paper-imagenet" and saved["params"] == {"p": 70.0}
    back = load(tmp_path / "d")
    assert back.preset_ == "paper-imagenet" and back.get_params() == {"p": 70.0}
    np.testing.assert_array_equal(back.score(feats), det.score(feats))
    # a detector file written before presets existed (no "preset" key) still loads
    del saved["preset"]
    (tmp_path / "d" / "detector.json").write_text(json.dumps(saved))
    old = load(tmp_path / "d")
    assert old.preset_ is None and old.get_params() == {"p": 70.0}


@pytest.mark.parametrize(("legacy", "lam"), [("imagenet", 0.5), ("coco", 1.0), ("voc", 1.0)])
def test_a_glmcm_saved_with_its_former_preset_parameter_loads(tmp_path, legacy, lam):
    det = create("glmcm", classes=CLASSES)
    det.save(tmp_path / "g")
    path = tmp_path / "g" / "detector.json"
    config = json.loads(path.read_text())
    config["params"].update(local_weight=None, preset=legacy)  # what glmcm saved before this change
    del config["preset"]
    path.write_text(json.dumps(config))
    back = load(tmp_path / "g")
    assert back.lambda_ == lam and "preset" not in back.get_params()
    # an explicit weight saved next to the old preset wins, as it did
    config["params"].update(local_weight=0.25)
    path.write_text(json.dumps(config))
    assert load(tmp_path / "g").lambda_ == 0.25


# ------------------------------------------------------------------------------ command line
@pytest.fixture
def tiny(monkeypatch, tmp_path):
    tiny_cli.install(monkeypatch)
    monkeypatch.setenv("OODSCOPE_CACHE", str(tmp_path / "feature-cache"))
    root = tmp_path / "data"
    tiny_cli.class_folders(root / "id", {"ant": 8, "bee": 8})
    tiny_cli.write_images(root / "flat", 6, seed=5)
    yield root
    from oodscope.backbones import clear_shared

    clear_shared()


def run(args, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _fit(root: Path, out: Path, *extra) -> list:
    return ["fit", "--backbone", CNN, "--method", "dice", "--id-dir", root / "id", "--calibration-fraction", "0.5",
            "--alpha", "0.2", "--workers", "0", "-o", out, *extra]


def test_fit_with_a_preset_records_it_and_loads(tiny, tmp_path, capsys):
    from oodscope.pipeline import OODModel

    code, out, err = run(_fit(tiny, tmp_path / "m", "--preset", "paper-imagenet"), capsys)
    assert code == 0, err
    assert "preset         paper-imagenet" in out and '{"p": 70.0}' in out
    config = json.loads((tmp_path / "m" / "model.json").read_text())
    assert config["preset"] == "paper-imagenet" and config["settings"]["preset"] == "paper-imagenet"
    assert config["method_params"] == {"p": 70.0}
    assert json.loads((tmp_path / "m" / "detector" / "detector.json").read_text())["preset"] == "paper-imagenet"
    model = OODModel.load(tmp_path / "m")
    assert model.preset == "paper-imagenet" and model.method_params == {"p": 70.0}
    assert model.detector_.preset_ == "paper-imagenet" and model.detector_.p == 70.0
    # --param wins over the preset
    code, out, err = run(_fit(tiny, tmp_path / "m2", "--preset", "paper-imagenet", "--param", "p=50"), capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "m2" / "model.json").read_text())["method_params"] == {"p": 50}
    # a model.json written before presets (no preset anywhere) still loads, with preset None
    for name in ("model.json", "detector/detector.json"):
        path = tmp_path / "m" / name
        data = json.loads(path.read_text())
        data.pop("preset")
        data.get("settings", {}).pop("preset", None)
        path.write_text(json.dumps(data))
    old = OODModel.load(tmp_path / "m")
    assert old.preset is None and old.method_params == {"p": 70.0} and old.detector_.p == 70.0
    assert "preset " not in old.describe()


def test_an_unknown_preset_is_exit_2_for_fit_and_bench(tiny, tmp_path, capsys):
    code, _, err = run(_fit(tiny, tmp_path / "m", "--preset", "imagenet"), capsys)
    assert code == 2 and "unknown preset 'imagenet'; presets: paper-imagenet, paper-cifar, openood-v1.5" in err
    assert not (tmp_path / "m").exists()
    code, _, err = run(["bench", "--backbone", CNN, "--detectors", "dice", "--id", tiny / "id", "--ood",
                        f"flat={tiny / 'flat'}", "--preset", "cifar", "--quiet", "-o", tmp_path / "b"], capsys)
    assert code == 2 and "unknown preset 'cifar'; presets: paper-imagenet" in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()
    config = tmp_path / "bench.toml"  # the config-file key is the field's name
    config.write_text('preset = "openood"\n')
    code, _, err = run(["bench", "--config", config, "--quiet", "-o", tmp_path / "b"], capsys)
    assert code == 2 and "unknown preset 'openood'" in err


def _bench(root: Path, out: Path, *extra) -> list:
    return ["bench", "--backbone", CNN, "--detectors", "dice,knn", "--id", root / "id", "--id-fit", root / "id",
            "--ood", f"far:flat={root / 'flat'}", "--no-report", "--quiet", "--workers", "0", "-o", out, *extra]


def _dice_scores(out: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    (path,) = out.glob("scores/*/dice.safetensors")
    return load_file(str(path))


def test_bench_with_a_preset_applies_and_records_it(tiny, tmp_path, capsys):
    knn_k = '{"knn": {"k": 2}}'  # the presets' k (50 / 1000) is more than the 16 fit images
    code, printed, err = run(_bench(tiny, tmp_path / "a", "--preset", "paper-imagenet", "--params", knn_k), capsys)
    assert code == 0, err
    payload = json.loads((tmp_path / "a" / "results.json").read_text())
    assert payload["config"]["preset"] == "paper-imagenet" and not payload["failures"]
    assert "Hyper-parameter preset: `paper-imagenet`" in (tmp_path / "a" / "results.md").read_text()
    assert "paper-imagenet" in printed
    # the preset's p=70 reached DICE: the same scores as p=70 given explicitly, others with OpenOOD's p=90
    code, _, err = run(_bench(tiny, tmp_path / "b", "--params", '{"knn": {"k": 2}, "dice": {"p": 70}}'), capsys)
    assert code == 0, err
    code, _, err = run(_bench(tiny, tmp_path / "c", "--preset", "openood-v1.5", "--params", knn_k), capsys)
    assert code == 0, err
    a, b, c = (_dice_scores(tmp_path / x) for x in "abc")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert any(not np.array_equal(a[key], c[key]) for key in a)
    # without the override, the preset's k reaches KNN: k=1000 on 16 fit images is recorded as not run
    code, _, err = run(_bench(tiny, tmp_path / "d", "--preset", "paper-imagenet"), capsys)
    failures = json.loads((tmp_path / "d" / "results.json").read_text())["failures"]
    assert code == 3 and [f["detector"] for f in failures] == ["knn"] and "1000" in failures[0]["reason"]


def test_the_listing_shows_the_presets(capsys):
    code, out, _ = run(["detectors", "dice"], capsys)
    assert code == 0 and "preset    paper-imagenet: p=70.0" in out and "preset    openood-v1.5: p=90.0" in out
    code, out, _ = run(["detectors", "--json"], capsys)
    listed = {d["name"]: d for d in json.loads(out)}
    assert listed["knn"]["presets"] == {"paper-imagenet": {"k": 1000, "subsample": 1.0},
                                        "paper-cifar": {"k": 50, "subsample": 1.0},
                                        "openood-v1.5": {"k": 50, "subsample": 1.0}}
    assert listed["msp"]["presets"] == {}
    code, out, _ = run(["detectors", "--presets"], capsys)
    assert code == 0
    for row in preset_rows():
        assert f"{row['detector']}.{row['parameter']} = {json.dumps(row['value'])}   ({row['source']})" in out
    for (_, name), why in NOT_SET.items():
        assert f"{name}: not set, keeps its defaults ({why})" in out
    code, out, _ = run(["detectors", "--presets", "--json"], capsys)
    assert json.loads(out) == preset_rows()


def test_the_preset_flags_name_every_preset():
    for command in ("fit", "bench"):
        parser = build_parser([command])._subparsers._group_actions[0].choices[command]
        (option,) = [a for a in parser._actions if "--preset" in a.option_strings]
        assert option.default in (None, argparse.SUPPRESS)  # not given: no preset (bench: the config's key)
        for name in PRESET_NAMES:
            assert name in option.help, (command, name)


def test_the_model_and_its_wrappers_take_a_preset():
    from oodscope.pipeline import OODModel
    from oodscope.pipeline.api import FewShotDetector, ZeroShotDetector

    model = OODModel("effnet-lite0", "knn", {"k": 3}, preset="paper-cifar")  # the backbone is created lazily
    assert (model.preset, model.method_params) == ("paper-cifar", {"k": 3, "subsample": 1.0})
    assert model.summary()["preset"] == "paper-cifar"
    few = FewShotDetector("effnet-lite0", "nnguide", preset="openood-v1.5", k=5)
    assert few.model.method_params == {"k": 5, "subsample": 0.01}
    zero = ZeroShotDetector("conse:effnet-lite0", CLASSES, "glmcm", preset="paper-imagenet")
    assert zero.model.method_params == {"classes": CLASSES, "local_weight": 0.5}


def test_the_docs_table_is_the_presets_table():
    """docs/pipeline.md's table of values (and sources) is the module's table, row for row."""
    text = (Path(__file__).parents[1] / "docs" / "pipeline.md").read_text(encoding="utf-8")
    section = text.split("### Presets", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `") and "." in line.split("|")[1]]
    shown = {}
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        detector, parameter = cells[0].strip("`").split(".")
        for preset, cell in zip(PRESET_NAMES, cells[2:], strict=True):
            if cell != "—":
                value, source = cell.split(" (", 1)
                shown[preset, detector, parameter] = json.loads(value)
                repo, path = source.rstrip(")").split(" ")
                actual = PRESETS[preset].detectors[detector][parameter].source
                assert f"/{repo} " in actual and path.strip("`") in actual, (preset, detector, parameter)
    assert shown == {(r["preset"], r["detector"], r["parameter"]): r["value"] for r in preset_rows()}
