"""The command-line contract, for every command: exit codes (0 done, 1 runtime failure, 2 bad
arguments, 3 some images unreadable), bad arguments refused before any image is read, one-line
messages without tracebacks or internal class names, options defined once (OODModel's settings,
BenchConfig's fields), ``--classes`` in one syntax, ``--overwrite``, ``--max-pixels``, fit
cautions on one line, ``oodscope detectors`` and zero-shot models fitted from class names alone.

Whole commands run in-process on tiny backbones reachable by spec (``tiny-cnn``, ``tiny-vl``:
``tests/tiny_cli.py``), so each takes well under a second.
"""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_cli

from oodscope.cli.main import build_parser, main

CNN, VL = tiny_cli.TINY_CLASSIFIER, tiny_cli.TINY_VISION_LANGUAGE


@pytest.fixture(autouse=True)
def tiny_backbones(monkeypatch, tmp_path):
    tiny_cli.install(monkeypatch)
    monkeypatch.setenv("OODSCOPE_CACHE", str(tmp_path / "feature-cache"))
    yield
    from oodscope.backbones import clear_shared

    clear_shared()


@pytest.fixture
def no_extraction(monkeypatch):
    """Any feature extraction fails the test: bad arguments must be refused before it starts."""
    import oodscope.evaluation.audit  # noqa: F401 - imported, so that their own binding of extract is patched
    import oodscope.evaluation.bench  # noqa: F401
    import oodscope.features.extract as extract_module

    def refuse(*args, **kwargs):
        raise AssertionError("feature extraction started before the arguments were checked")

    original = extract_module.extract
    for module in list(sys.modules.values()):
        if getattr(module, "extract", None) is original:
            monkeypatch.setattr(module, "extract", refuse)


@pytest.fixture
def folders(tmp_path):
    root = tmp_path / "data"
    tiny_cli.class_folders(root / "id", {"ant": 8, "bee": 8})
    tiny_cli.write_images(root / "flat", 6, seed=5)
    tiny_cli.write_images(root / "test", 4, seed=9)
    (root / "empty" / "a").mkdir(parents=True)
    (root / "empty" / "b").mkdir()
    (root / "classes.txt").write_text("ant\nbee\n\n", encoding="utf-8")
    (root / "busy").mkdir()
    (root / "busy" / "notes.txt").write_text("something else", encoding="utf-8")
    return root


def run(args, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def fit_zero_shot(folders, output, *extra) -> list:
    return ["fit", "--backbone", VL, "--method", "mcm", "--classes", "ant,bee", "--workers", "0", "-o", output,
            *extra]


# ------------------------------------------------------------------------- bad arguments: exit 2
def bad_argument_cases(root: Path, tmp: Path) -> dict[str, tuple[list, str]]:
    """name -> (argv, a phrase the message must contain)."""
    knn = ["fit", "--backbone", CNN, "--method", "knn", "--id-dir", root / "id", "-o", tmp / "m"]
    model = tmp / "uncalibrated"
    bench = ["bench", "--backbone", CNN, "--id", root / "id", "--ood", f"x={root / 'flat'}", "-o", tmp / "b"]
    audit = ["audit", "corruptions", "--backbone", CNN, "--id", root / "id", "--ood", f"x={root / 'flat'}",
             "-o", tmp / "a", "--detectors", "msp"]
    return {
        "fit unknown parameter": (knn + ["--param", "kk=10"], "its parameters: k=None, feature="),
        "fit unknown method": (["fit", "--backbone", CNN, "--method", "knnn", "--id-dir", root / "id",
                                "-o", tmp / "m"], "unknown method 'knnn'"),
        "fit unknown backbone": (["fit", "--backbone", "effnet-lite9", "--method", "knn", "--id-dir",
                                  root / "id", "-o", tmp / "m"], "unknown backbone 'effnet-lite9'"),
        "fit missing --id-dir": (knn[:-4] + ["--id-dir", root / "nope", "-o", tmp / "m"], str(root / "nope")),
        "fit no class folders": (knn[:-4] + ["--id-dir", root / "empty", "-o", tmp / "m"],
                                 "has no class sub-folders with images; --id-dir expects one sub-folder per class"),
        "fit alpha out of range": (knn + ["--alpha", "1.5"], "argument --alpha: must be in (0, 1)"),
        "fit param of the wrong kind": (knn + ["--param", "subsample=much"], "subsample takes a number"),
        "fit too few calibration images": (knn + ["--alpha", "0.01"], "at least 99 calibration images"),
        "fit output not empty": (knn[:-1] + [root / "busy"], "is not empty"),
        "fit classes as a bare file": (["fit", "--backbone", VL, "--method", "mcm", "--classes",
                                        root / "classes.txt", "-o", tmp / "m"], "write @"),
        "fit zero-shot on a classifier": (["fit", "--backbone", CNN, "--method", "mcm", "--classes", "a,b",
                                           "-o", tmp / "m"], "needs a text encoder"),
        "fit logits from a vision-language backbone": (["fit", "--backbone", VL, "--method", "energy", "--id-dir",
                                                        root / "id", "-o", tmp / "m"], "reads logits"),
        "fit calibration on the fit images": (knn + ["--calibration-dir", root / "id"], "held out"),
        "fit labels from a flat folder": (["fit", "--backbone", CNN, "--method", "mahalanobis", "--id-dir",
                                           root / "flat", "-o", tmp / "m"], "needs the class of every ID image"),
        "fit required parameter": (["fit", "--backbone", VL, "--method", "eoe", "--classes", "a,b", "-o",
                                    tmp / "m"], "missing required parameter(s) outlier_classes"),
        "score not a model": (["score", root / "id", root / "test"], "not a saved oodscope model"),
        "score missing image": (["score", model, root / "nope.png"], "nope.png: no such file"),
        "score fdr out of range": (["score", model, root / "test", "--fdr", "2"], "argument --fdr"),
        "score fdr uncalibrated": (["score", model, root / "test", "--fdr", "0.1"], "not calibrated"),
        "score output exists": (["score", model, root / "test", "-o", root / "classes.txt"], "--overwrite"),
        "extract unknown backbone": (["extract", "nonet", root / "id", "-o", tmp / "e"], "unknown backbone"),
        "extract missing data": (["extract", CNN, root / "nope", "-o", tmp / "e"], str(root / "nope")),
        "extract limit": (["extract", CNN, root / "id", "-o", tmp / "e", "--limit", "0"], "argument --limit"),
        "extract output not an extract": (["extract", CNN, root / "id", "-o", root / "busy"], "is not empty"),
        "bench unknown detector": (bench + ["--detectors", "msp,nope"], "unknown detector(s) nope"),
        "bench unknown parameter": (bench + ["--params", '{"knn": {"kk": 1}}'], "unknown parameter(s) kk"),
        "bench classes file missing": (bench + ["--classes", f"@{root / 'none.txt'}"], "cannot read"),
        "bench limit": (bench + ["--limit", "0"], "argument --limit"),
        "bench config missing": (bench + ["--config", root / "none.toml"], "no such file"),
        "bench missing data": (bench[:5] + ["--ood", f"x={root / 'nope'}", "-o", tmp / "b"], str(root / "nope")),
        "bench unknown backbone": (["bench", "--backbone", "nonet", "--id", root / "id", "--ood",
                                    f"x={root / 'flat'}", "-o", tmp / "b"], "unknown backbone"),
        "bench output not results": (bench[:-1] + [root / "busy"], "is not empty"),
        "audit missing id": (["audit", "prompts", "--backbone", VL, "--ood", root / "flat", "-o", tmp / "a"],
                             "--id DATA is needed"),
        "audit unknown corruption": (audit + ["--corruptions", "rain"], "unknown corruption(s) rain"),
        "audit severities": (audit + ["--severities", "0,9"], "--severities"),
        "audit fit needed": (audit[:-1] + ["knn"], "--fit DATA"),
        "audit missing ood": (audit[:6] + ["--ood", f"x={root / 'nope'}", "-o", tmp / "a"], str(root / "nope")),
        "info not a model": (["info", root / "id"], "not a saved oodscope model"),
        "report not results": (["report", root / "nope"], "no such directory"),
        "detectors unknown": (["detectors", "nope"], "unknown detector 'nope'"),
    }


CASES = sorted(bad_argument_cases(Path("r"), Path("t")))


@pytest.mark.parametrize("case", CASES)
def test_bad_arguments_exit_2_before_any_image_is_read(case, folders, tmp_path, capsys, request):
    if case.startswith("score"):
        assert main([str(a) for a in fit_zero_shot(folders, tmp_path / "uncalibrated")]) == 0
        capsys.readouterr()
    request.getfixturevalue("no_extraction")
    argv, phrase = bad_argument_cases(folders, tmp_path)[case]
    try:
        code, _, err = run(argv, capsys)
    except SystemExit as exc:  # argparse's own errors
        code, err = exc.code, capsys.readouterr().err
    assert code == 2, (case, err)
    assert phrase in err, (case, err)
    assert "Traceback" not in err
    command = str(argv[0])
    assert re.search(rf"oodscope {command}[a-z ]*: error: ", err), err
    for internal in ("ImageFolder", "FlatFolder", "DatasetError", "OODModelError", "DetectorError"):
        assert internal not in err, (case, err)


def test_the_issue_command_fails_in_a_subprocess_before_extracting(tmp_path):
    """`oodscope fit --backbone effnet-lite0 --method knn --param kk=10 --id-dir D -o M`: the parameters
    are checked before the backbone is even created."""
    images = tmp_path / "D"
    tiny_cli.class_folders(images, {"a": 2, "b": 2})
    done = subprocess.run(
        [sys.executable, "-m", "oodscope.cli", "fit", "--backbone", "effnet-lite0", "--method", "knn", "--param",
         "kk=10", "--id-dir", str(images), "-o", str(tmp_path / "M")],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("oodscope fit: error: knn: unknown parameter(s) kk; its parameters: k=None")
    assert done.stderr.count("\n") == 1  # one line
    assert not (tmp_path / "M").exists()


def test_a_runtime_failure_exits_1_with_one_line(folders, tmp_path, capsys, monkeypatch):
    assert main([str(a) for a in fit_zero_shot(folders, tmp_path / "m")]) == 0
    capsys.readouterr()
    import oodscope.pipeline.model as model_module

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_module.OODModel, "predict_iter", broken)
    code, out, err = run(["score", tmp_path / "m", folders / "test"], capsys)
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "oodscope score: error: [Errno 28] No space left on device"


# ------------------------------------------------------------------------- options defined once
def test_fit_options_are_oodmodel_settings():
    from oodscope.pipeline import OODModel
    from oodscope.pipeline.fitting import HEADS, SET_METHODS
    from oodscope.pipeline.options import MODEL_OPTIONS

    signature = inspect.signature(OODModel.__init__).parameters
    for option in MODEL_OPTIONS:
        assert option.name in signature, option.name
        assert signature[option.name].default == option.default, (
            f"{option.name}: OODModel's default {signature[option.name].default!r}, the option table's "
            f"{option.default!r}")
        assert option.check(option.default) == option.default
    choices = {o.name: o.choices for o in MODEL_OPTIONS if o.choices is not None}
    assert choices == {"prediction_sets": (*SET_METHODS, None), "head": (*HEADS, None)}

    fit = build_parser(["fit"])._subparsers._group_actions[0].choices["fit"]
    defaults = {a.dest: a.default for a in fit._actions}
    flags = {s for a in fit._actions for s in a.option_strings}
    for option in MODEL_OPTIONS:
        assert option.flag in flags
        expected = None if option.name == "calibration_fraction" else option.default  # None: "not given"
        assert defaults[option.name] == expected, option.name


def test_a_disagreeing_default_is_caught(monkeypatch):
    """The check above fails when OODModel's signature and the table disagree."""
    from oodscope.pipeline import options

    changed = [o if o.name != "alpha" else options.ModelOption(**{**o.__dict__, "default": 0.1})
               for o in options.MODEL_OPTIONS]
    monkeypatch.setattr(options, "MODEL_OPTIONS", tuple(changed))
    with pytest.raises(AssertionError, match="alpha"):
        test_fit_options_are_oodmodel_settings()


def test_bench_flags_are_benchconfig_fields(tmp_path):
    import dataclasses

    from oodscope.cli.commands.bench import build_config
    from oodscope.evaluation.bench_config import BenchConfig

    bench = build_parser(["bench"])._subparsers._group_actions[0].choices["bench"]
    by_dest = {a.dest: a for a in bench._actions}
    flagged = [f for f in dataclasses.fields(BenchConfig) if "flag" in f.metadata]
    unflagged = {f.name for f in dataclasses.fields(BenchConfig)} - {f.name for f in flagged}
    assert unflagged == {"backbone_options"}  # a table per backbone: config files only
    for f in flagged:
        flag = f.metadata["flag"]
        assert by_dest[f.name].option_strings[-1] == (flag if isinstance(flag, str) else flag[-1])
        assert f.metadata["help"].split()[0] in by_dest[f.name].help
    # Every kind of flag lands in its field.
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n")
    args = bench.parse_args(["--backbone", "a", "--backbone", "b", "--detectors", "msp,knn", "--id", "digits",
                             "--ood", "far:t=textiles", "--classes", f"@{names}", "--limit", "5", "--stream",
                             "--stream-batch", "7", "--no-report", "--quiet", "--id-accuracy", "probe",
                             "--params", '{"knn": {"k": 3}}', "--workers", "0", "-o", str(tmp_path / "o")])
    cfg = build_config(args)
    assert cfg.backbones == ["a", "b"] and cfg.detectors == "msp,knn" and cfg.id == "digits"
    assert cfg.ood[0].name == "t" and cfg.ood[0].kind == "far" and cfg.classes == ["cat", "dog"]
    assert cfg.limit == 5 and cfg.stream and cfg.stream_batch == 7 and not cfg.report and not cfg.progress
    assert cfg.id_accuracy == "probe" and cfg.detector_params == {"knn": {"k": 3}} and cfg.num_workers == 0
    assert cfg.output == tmp_path / "o" and cfg.batch_size == 64  # not given: BenchConfig's default


# ------------------------------------------------------------------------- --classes, one syntax
def test_classes_from_a_file_in_fit_and_bench(folders, tmp_path, capsys):
    code, out, _ = run(["fit", "--backbone", VL, "--method", "mcm", "--classes", f"@{folders / 'classes.txt'}",
                        "--workers", "0", "-o", tmp_path / "m"], capsys)
    assert code == 0 and "ID classes     ant, bee" in out
    from oodscope.cli.commands.bench import build_config

    args = build_parser(["bench"]).parse_args(["bench", "--classes", f"@{folders / 'classes.txt'}"])
    assert build_config(args).classes == ["ant", "bee"]
    for command in (["fit"], ["bench"], ["audit", "prompts"], ["audit", "corruptions"]):
        parser = build_parser(command)
        for name in command:
            parser = parser._subparsers._group_actions[0].choices[name]
        option = next(a for a in parser._actions if "--classes" in a.option_strings)
        assert '"a,b,c", or @FILE with one name per line' in option.help, command


def test_class_names_given_twice_are_refused(folders, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--backbone", VL, "--method", "mcm", "--classes", "ant,bee,ant", "-o", str(tmp_path / "m")])
    assert exc.value.code == 2 and "given twice: ant" in capsys.readouterr().err


# ------------------------------------------------------------------------- zero-shot from class names
def test_zero_shot_from_class_names_alone_scores(folders, tmp_path, capsys):
    model = tmp_path / "mcm"
    code, out, err = run(fit_zero_shot(folders, model), capsys)
    assert code == 0 and (model / "model.json").is_file()
    assert "calibration    none yet" in out and "None" not in out
    assert "oodscope fit: note:" in err and "--calibration-dir" in err
    code, out, err = run(["score", model, folders / "test", "--format", "jsonl", "--workers", "0"], capsys)
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 4
    for row in rows:
        assert isinstance(row["score"], float) and row["p_value"] is None and row["ood"] is None
        assert row["predicted_class"] in ("ant", "bee") and row["error"] is None
    notes = [line for line in err.splitlines() if "not calibrated" in line]
    assert len(notes) == 2 and "oodscope fit ... --calibration-dir" in notes[0]  # the note and the summary
    code, out, _ = run(["score", model, folders / "test", "--format", "csv", "--workers", "0"], capsys)
    first = out.splitlines()[1].split(",")
    assert code == 0 and first[2:4] == ["", ""]  # p_value, ood empty
    code, out, _ = run(["score", model, folders / "test", "--workers", "0"], capsys)
    assert code == 0 and all(line.startswith(" " * 8) for line in out.splitlines()[1:])  # no decision
    code, _, err = run(["score", model, folders / "test", "--fdr", "0.1"], capsys)
    assert code == 2 and "--fdr needs p-values" in err


def test_unmatched_class_names_are_reported(folders, tmp_path, capsys):
    code, out, _ = run(["fit", "--backbone", VL, "--method", "mcm", "--classes", "ant,zebra", "--calibration-dir",
                        folders / "id", "--alpha", "0.2", "--workers", "0", "-o", tmp_path / "m"], capsys)
    assert code == 0
    assert "note           class name(s) zebra match no calibration folder" in out
    assert "note           calibration folder(s) bee match no class name" in out


# ------------------------------------------------------------------------- --overwrite
def test_overwrite(folders, tmp_path, capsys):
    model = tmp_path / "m"
    assert run(fit_zero_shot(folders, model), capsys)[0] == 0
    code, _, err = run(fit_zero_shot(folders, model), capsys)
    assert code == 2 and f"-o {model} is not empty" in err and "--overwrite" in err
    code, _, _ = run(fit_zero_shot(folders, model, "--overwrite"), capsys)
    assert code == 0
    target = tmp_path / "scores.csv"
    assert run(["score", model, folders / "test", "-o", target, "--workers", "0"], capsys)[0] == 0
    code, _, err = run(["score", model, folders / "test", "-o", target], capsys)
    assert code == 2 and "exists" in err
    assert run(["score", model, folders / "test", "-o", target, "--overwrite", "--workers", "0"], capsys)[0] == 0
    code, _, err = run(["fit", "--backbone", VL, "--method", "mcm", "--classes", "a,b", "-o", target], capsys)
    assert code == 2 and "is a file" in err


def test_extract_resumes_into_its_own_directory(folders, tmp_path, capsys):
    out = tmp_path / "features"
    code, printed, _ = run(["extract", CNN, folders / "id", "-o", out, "--workers", "0"], capsys)
    assert code == 0 and "16/16 images" in printed
    code, printed, _ = run(["extract", CNN, folders / "id", "-o", out, "--workers", "0"], capsys)
    assert code == 0 and "16 from cache" in printed  # no --overwrite needed to resume


# ------------------------------------------------------------------------- messages
def test_max_pixels_one_message_and_one_option(folders, tmp_path, capsys):
    import struct
    import zlib

    from oodscope.io import ImageSource
    from oodscope.io.images import DEFAULT_MAX_PIXELS, ImageLoadError, decode_image

    def header(side: int) -> bytes:
        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        body = chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")
        return b"\x89PNG\r\n\x1a\n" + body

    reasons = []
    for side in (10_000, 20_000):  # caught by oodscope's check / by Pillow's hard limit
        with pytest.raises(ImageLoadError) as err:
            decode_image(header(side), path=f"{side}.png")
        reasons.append(err.value.reason)
        assert f"{side}.png" in str(err.value) and f"{side * side:,} pixels" in err.value.reason
    assert reasons[0].replace("100,000,000", "N") == reasons[1].replace("400,000,000", "N")
    assert f"more than the limit of {DEFAULT_MAX_PIXELS:,} pixels" in reasons[0] and "--max-pixels" in reasons[0]

    model = tmp_path / "m"
    assert run(fit_zero_shot(folders, model), capsys)[0] == 0
    code, out, err = run(["score", model, folders / "test", "--max-pixels", "100", "--format", "jsonl",
                          "--workers", "0"], capsys)
    assert code == 3  # every image is 16 x 16 = 256 pixels
    rows = [json.loads(line) for line in out.splitlines()]
    assert all(r["error"] == "image too large: 256 pixels, more than the limit of 100 pixels (max_pixels; "
               "--max-pixels on the command line)" for r in rows)
    assert "4 image(s) could not be read" in err
    assert ImageSource.max_pixels == DEFAULT_MAX_PIXELS  # restored after the command
    for command in ("extract", "fit", "score", "bench"):
        assert "--max-pixels" in build_parser([command]).format_help() or _has_flag(command, "--max-pixels")
    assert _has_flag("audit prompts", "--max-pixels") and _has_flag("audit corruptions", "--max-pixels")


def _has_flag(command: str, flag: str) -> bool:
    parser = build_parser(command.split())
    for name in command.split():
        parser = parser._subparsers._group_actions[0].choices[name]
    return any(flag in a.option_strings for a in parser._actions)


def test_fit_caution_is_one_line(folders, tmp_path, capsys):
    code, _, err = run(["fit", "--backbone", CNN, "--method", "mahalanobis", "--id-dir", folders / "id",
                        "--calibration-fraction", "0.5", "--alpha", "0.2", "--workers", "0", "-o", tmp_path / "m"],
                       capsys)
    assert code == 0
    cautions = [line for line in err.splitlines() if "caution" in line]
    assert cautions == [line for line in err.splitlines() if "mahalanobis: fitted on 8 images" in line]
    assert len(cautions) == 1 and cautions[0].startswith("oodscope fit: caution: mahalanobis: fitted on 8 images")
    assert "Warning" not in err and ".py:" not in err  # no Python warning source line


def test_info_never_prints_none(folders, tmp_path, capsys):
    zero_shot, feature = tmp_path / "zs", tmp_path / "knn"
    assert run(fit_zero_shot(folders, zero_shot), capsys)[0] == 0
    assert run(["fit", "--backbone", CNN, "--method", "knn", "--id-dir", folders / "id", "--alpha", "0.2",
                "--calibration-fraction", "0.5", "--workers", "0", "-o", feature], capsys)[0] == 0
    sparse = tmp_path / "sparse"
    sparse.mkdir()
    config = json.loads((feature / "model.json").read_text())
    keep = {"format", "method", "calibration"}
    (sparse / "model.json").write_text(json.dumps({k: v for k, v in config.items() if k in keep}))
    for model in (zero_shot, feature, sparse):
        code, out, err = run(["info", model], capsys)
        assert code == 0, err
        assert "None" not in out and "null" not in out, out
    _, out, _ = run(["info", feature], capsys)
    assert "[feature-space]" in out and "threshold      t = " in out
    _, out, _ = run(["info", sparse], capsys)
    assert "calibration    none yet" in out and "backbone       a backbone object" in out


# ------------------------------------------------------------------------- oodscope detectors
def test_detectors_lists_every_registered_method(capsys):
    from oodscope.detectors import registered

    code, out, _ = run(["detectors"], capsys)
    assert code == 0
    for name, cls in registered().items():
        assert re.search(rf"^{re.escape(name)}  \[{re.escape(cls.kind.label)}\]", out, re.M), name
    assert "knn  [feature-space]" in out and "cites     Sun, Ming, Zhu & Li" in out
    assert 'k=null, feature="auto"' in out and "classes (required)" in out
    code, out, _ = run(["detectors", "--json"], capsys)
    listed = {d["name"]: d for d in json.loads(out)}
    assert code == 0 and set(listed) == set(registered())
    assert listed["mcm"]["kind_label"] == "zero-shot" and listed["mcm"]["needs"] == "class names + text encoder"
    assert listed["mahalanobis"]["reads"] == ["embedding"] and listed["mcm"]["required"] == ["classes"]
    assert listed["knn"]["defaults"]["k"] is None and "ICML 2022" in listed["knn"]["cites"]
    code, out, _ = run(["detectors", "knn"], capsys)
    assert code == 0 and "Defaults:" in out and "knn  [feature-space]" in out


def test_bench_runs_and_rewrites_its_own_results(folders, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "--backbone", CNN, "--detectors", "msp,mahalanobis", "--id", folders / "id", "--id-fit",
            folders / "id", "--fit-limit", "6", "--ood", f"far:flat={folders / 'flat'}", "--no-report", "--quiet",
            "--workers", "0", "-o", out]
    code, printed, err = run(argv, capsys)
    assert code == 0, err
    assert (out / "results.json").is_file() and "| msp |" in printed
    # the fit caution, once, on one line (6 fit images of 8-d features, 2 classes: a singular covariance)
    cautions = [line for line in err.splitlines() if "caution" in line]
    assert len(cautions) == 1 and cautions[0].startswith("oodscope bench: caution: mahalanobis: fitted on 6 images")
    code, _, err = run(argv, capsys)  # a directory bench wrote is rewritten without --overwrite
    assert code == 0, err
