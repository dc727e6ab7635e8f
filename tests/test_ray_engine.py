"""The Ray engine (issue 13) on a real Ray cluster: one machine, 2 CPUs, loopback only, stopped at the end.

Extraction and scoring through Ray Data are compared with the local engine on the same images (a
few hundred small PNGs, a corrupt file among them, one image present twice): the same rows, content
hashes, failure lists (path and reason) and features; scores, p-values, decisions, classes and
prediction sets equal to 1e-6. The feature store the cluster fills is the local one (a local
extraction afterwards computes nothing). A re-run resumes: only partitions not yet written are
computed. Worker processes killed mid-job (an actor in its forward pass, a CPU task reading an image)
are restarted / retried by Ray, and the output still holds every image exactly once. The three
commands (``extract``, ``score``, ``bench``) run with ``--engine ray``, one of them from another process
joining the cluster with ``--address HOST:PORT``.

Workers create the tiny backbones by spec through ``tests/ray_tiny.py`` (Ray's worker set-up hook).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray is imported: listen on 127.0.0.1

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'oodscope[ray]'): no Ray engine to test")
pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'ray[data]')")

import ray_tiny  # noqa: E402
import tiny_cli  # noqa: E402

from oodscope.cli.main import main  # noqa: E402
from oodscope.engines import EngineUnavailable  # noqa: E402
from oodscope.engines import extract as engine_extract  # noqa: E402
from oodscope.engines import ray as ray_engine  # noqa: E402
from oodscope.engines import score as engine_score  # noqa: E402
from oodscope.engines.jobs import SCORE_COLUMNS  # noqa: E402
from oodscope.features.extract import extract as local_extract  # noqa: E402
from oodscope.io import resolve_images  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")  # Ray Data's own settings churn

CNN = tiny_cli.TINY_CLASSIFIER
PART = 32  # images per partition: 10 partitions of the 303 test images
TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A real Ray cluster on this machine (2 CPUs, 127.0.0.1), stopped when the module's tests are done."""
    faults = tmp_path_factory.mktemp("faults")
    path = os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])])
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning",
             _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": path, ray_tiny.FAULTS_ENV: str(faults)},
                          "worker_process_setup_hook": "ray_tiny.install"})
    try:
        yield SimpleNamespace(faults=faults, address=ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()


@pytest.fixture(autouse=True)
def tiny_backbones(monkeypatch, tmp_path):
    tiny_cli.install(monkeypatch)
    monkeypatch.setenv("OODSCOPE_CACHE", str(tmp_path / "feature-cache"))
    yield
    from oodscope.backbones import clear_shared

    clear_shared()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-data")
    tiny_cli.class_folders(root / "id", {"ant": 60, "bee": 60})
    tiny_cli.write_images(root / "test", 300, seed=11)
    (root / "test" / "zz-broken.png").write_bytes(b"this is no PNG")
    (root / "test" / "zz-copy.png").write_bytes((root / "test" / "img007.png").read_bytes())  # same content
    (root / "test" / "zz-empty.png").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def model_dir(data, tmp_path_factory):
    """KNN on the tiny CNN, fitted and calibrated on 120 ID images, with a linear-probe head and APS sets."""
    from oodscope.pipeline import OODModel

    folder = tmp_path_factory.mktemp("model") / "m"
    with pytest.MonkeyPatch.context() as patch:
        tiny_cli.install(patch)
        OODModel(CNN, "knn", progress=False, num_workers=0).fit(data / "id").save(folder)
    from oodscope.backbones import clear_shared

    clear_shared()
    return folder


def local_features(data):
    from oodscope.backbones import create_shared

    return local_extract(create_shared(CNN), resolve_images(data / "test"), num_workers=0, progress=False)


def chunk_hashes(store_root: Path) -> list[bytes]:
    """Every row of every chunk of a feature store, by content hash (duplicates kept)."""
    from safetensors import safe_open

    out = []
    for path in sorted((store_root / "chunks").glob("chunk-*.safetensors")):
        with safe_open(str(path), framework="numpy") as fh:
            out += [bytes(h) for h in fh.get_tensor("hash")]
    return out


def same_failures(a, b) -> None:
    assert [(f.index, f.item_id, f.reason) for f in a] == [(f.index, f.item_id, f.reason) for f in b]


def assert_same_extraction(got, want) -> None:
    assert got.item_ids == want.item_ids and got.hashes == want.hashes
    assert np.array_equal(got.indices, want.indices)
    same_failures(got.failures, want.failures)
    for name in ("embedding", "logits", "penultimate"):
        np.testing.assert_allclose(getattr(got.features, name), getattr(want.features, name), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ pieces
def test_known_hashes_are_found_by_their_16_bytes():
    from oodscope.engines.workers import Known

    digests = [bytes(16), b"\x01" + bytes(15), bytes(15) + b"\x01", b"ab" + bytes(14), b"ab" + bytes(13) + b"\x02"]
    known = Known(np.array(sorted(digests[:3]), dtype="S16"))
    assert [d in known for d in digests] == [True, True, True, False, False]
    assert b"x" * 16 not in Known(None)


def test_partitions_and_job_keys(tmp_path):
    from oodscope.engines.jobs import ScoreJob, check_score_directory, inputs_key, partition_bounds, write_job

    assert partition_bounds(70, 32) == [(0, 32), (32, 64), (64, 70)] and partition_bounds(0, 8) == []
    assert inputs_key(["a", "b"], 32) != inputs_key(["a", "b"], 16) != inputs_key(["b", "a"], 16)
    job = ScoreJob("m", inputs_key(["a"], 4), 1, 4)
    write_job(tmp_path / "o", job)
    check_score_directory(tmp_path / "o", job, overwrite=False)  # the same job: resumes
    with pytest.raises(ValueError, match="the model differ"):
        check_score_directory(tmp_path / "o", ScoreJob("other", job.inputs, 1, 4), overwrite=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no score job"):
        check_score_directory(tmp_path / "busy", job, overwrite=False)


# ------------------------------------------------------------------------------------------ extract
def test_extract_on_ray_is_local_extraction(cluster, data, tmp_path):
    cache = tmp_path / "cache"
    got = ray_engine.extract(CNN, data / "test", cache_dir=cache, partition_size=PART, progress=False)
    want = local_features(data)
    assert_same_extraction(got, want)
    assert len(want.failures) == 2 and {f.reason for f in want.failures} >= {"not a recognised image format"}
    assert got.n_computed == len(want.hashes) and got.n_cached == 0
    # The cluster filled the local feature store: a local extraction finds every image there.
    from oodscope.backbones import create_shared

    again = local_extract(create_shared(CNN), resolve_images(data / "test"), cache_dir=cache, num_workers=0,
                          progress=False)
    assert again.n_cached == len(want.hashes) and again.n_computed == 0
    assert_same_extraction(again, want)
    # Every image is in the store once (the duplicate file twice, as a local extraction computes it).
    assert sorted(chunk_hashes(got.store.root)) == sorted(want.hashes)
    # A re-run skips every partition: no Ray job, nothing computed, the same result.
    rerun = ray_engine.extract(CNN, data / "test", cache_dir=cache, partition_size=PART, progress=False)
    assert rerun.n_computed == 0 and rerun.n_cached == len(want.hashes)
    assert_same_extraction(rerun, want)
    # Two partitions' records lost (a crash before they were written): only those two run again, and their
    # images are not computed again either, since the store holds them (as a local re-run only hashes).
    records = sorted((got.store.root / "ray-jobs").glob("*/part-*.json"))
    assert len(records) == 10
    for path in records[3:5]:
        path.unlink()
    resumed = ray_engine.extract(CNN, data / "test", cache_dir=cache, partition_size=PART, progress=False)
    assert resumed.n_computed == 0 and all(path.is_file() for path in records)
    assert_same_extraction(resumed, want)
    assert sorted(chunk_hashes(got.store.root)) == sorted(want.hashes)
    # The engine switch of the Python API.
    through = engine_extract(CNN, data / "test", engine="ray", cache_dir=cache, partition_size=PART, progress=False)
    assert through.hashes == want.hashes


# ------------------------------------------------------------------------------------------ score
def local_predictions(model_dir, images):
    from oodscope.pipeline import OODModel

    return OODModel.load(model_dir, progress=False, num_workers=0).predict(images)


def assert_same_rows(table, want) -> None:
    rows = table.to_pylist()
    assert table.column_names == list(SCORE_COLUMNS)
    assert [r["item"] for r in rows] == want.item_ids
    expected = want.to_dicts()
    for row, exp in zip(rows, expected, strict=True):
        assert row["error"] == exp["error"], row["item"]
        for key in ("score", "p_value", "class_probability"):
            if exp[key] is None:
                assert row[key] is None, (row["item"], key)
            else:
                assert abs(row[key] - exp[key]) <= 1e-6, (row["item"], key, row[key], exp[key])
        for key in ("ood", "predicted_class", "prediction_set"):
            assert row[key] == exp[key], (row["item"], key)


def assert_same_tables(a, b) -> None:
    assert a.column_names == b.column_names == list(SCORE_COLUMNS) and len(a) == len(b)
    for x, y in zip(a.to_pylist(), b.to_pylist(), strict=True):
        for key in SCORE_COLUMNS:
            if isinstance(x[key], float):
                assert abs(x[key] - y[key]) <= 1e-6, (x["item"], key)
            else:
                assert x[key] == y[key], (x["item"], key)


def test_score_on_ray_is_local_scoring_and_resumes(cluster, data, model_dir, tmp_path):
    out = tmp_path / "scores"
    run = ray_engine.score(model_dir, [data / "test"], out, partition_size=PART, progress=False)
    want = local_predictions(model_dir, [data / "test"])
    assert run.written == 10 and run.skipped == 0 and run.images == len(want)
    assert_same_rows(run.table(), want)
    assert run.failures == want.failures and len(run.failures) == 2
    assert run.n_ood == int(want.ood[want.ok].sum()) and run.calibrated
    assert any(r.prediction_set for r in want)  # prediction sets are compared too
    # Resume: a partition lost (or never written) is the only one computed again.
    lost = out / "part-000004.parquet"
    lost.unlink()
    again = ray_engine.score(model_dir, [data / "test"], out, partition_size=PART, progress=False)
    assert again.written == 1 and again.skipped == 9 and lost.is_file()
    assert_same_rows(again.table(), want)
    # Another job's images into that directory are refused before anything runs; overwrite replaces them. The
    # local engine writes the same partitions (the Python API's engine switch).
    with pytest.raises(ValueError, match="another score job"):
        ray_engine.plan_score(model_dir, [data / "id"], out, partition_size=PART)
    here = engine_score(model_dir, [data / "test"], tmp_path / "local", engine="local", partition_size=PART,
                        num_workers=0, progress=False)
    assert [p.name for p in here.partitions] == [p.name for p in run.partitions]
    assert_same_tables(here.table(), run.table())
    other = engine_score(model_dir, [data / "id"], out, engine="local", partition_size=PART, overwrite=True,
                         num_workers=0, progress=False)
    assert other.skipped == 0 and len(other.partitions) == 4 and not (out / "part-000009.parquet").exists()


def test_killed_workers_are_retried_nothing_lost_nothing_doubled(cluster, data, model_dir, tmp_path):
    """In one score job an actor exits (``os._exit``) in its second forward pass and a CPU task exits while
    reading image 150: Ray restarts / retries them, and the output holds every image exactly once."""
    from oodscope.features.extract import content_hash

    source = resolve_images(data / "test")
    forward_arm, read_arm = cluster.faults / "forward.arm", tmp_path / "read.arm"
    forward_arm.touch()
    read_arm.touch()
    run = ray_engine.score(model_dir, ray_tiny.CrashOnRead(source, 150, read_arm), tmp_path / "scores",
                           partition_size=PART, progress=False)
    assert not forward_arm.exists() and forward_arm.with_suffix(".fired").exists(), "no actor was killed"
    assert not read_arm.exists() and read_arm.with_suffix(".fired").exists(), "no task was killed"
    want = local_predictions(model_dir, source)
    assert_same_rows(run.table(), want)  # every row, in order, equal to the local engine's
    # By content hash: the rows' images are the input's, each once (the copied file is its own row).
    rows = [content_hash(Path(item).read_bytes()) for item in run.table(["item"]).column("item").to_pylist()]
    inputs = [content_hash(Path(source.item_id(i)).read_bytes()) for i in range(len(source))]
    assert sorted(rows) == sorted(inputs) and len(rows) == len(source)


# ------------------------------------------------------------------------------------------ command line
def run_cli(args, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_extract_and_score_on_ray(cluster, data, model_dir, tmp_path, capsys):
    local, remote = tmp_path / "local", tmp_path / "ray"
    code, _, err = run_cli(["extract", CNN, data / "test", "-o", local, "--workers", "0"], capsys)
    assert code == 3, err
    code, out, err = run_cli(["extract", CNN, data / "test", "-o", remote, "--engine", "ray"], capsys)
    assert code == 3, err
    assert "303 images" in out and "2 image(s) could not be read" in err
    for name in ("items.jsonl", "failures.jsonl"):
        assert read_jsonl(remote / name) == read_jsonl(local / name), name
    summary = json.loads((remote / "summary.json").read_text())
    assert summary["extracted"] == 301 and summary["failed"] == 2 and summary["computed"] == 301

    csv_file = tmp_path / "local.csv"
    code, _, err = run_cli(["score", model_dir, data / "test", "--format", "csv", "-o", csv_file], capsys)
    assert code == 3, err
    code, _, err = run_cli(["score", model_dir, data / "test", "-o", tmp_path / "parts", "--engine", "ray",
                            "--chunk-size", PART], capsys)
    assert code == 3, err
    assert "301/303 image(s) scored" in err and "10 Parquet partition(s)" in err
    with open(csv_file, newline="") as fh:
        expected = list(csv.DictReader(fh))
    import pyarrow.parquet as pq

    table = pq.read_table(sorted((tmp_path / "parts").glob("part-*.parquet")))
    assert table.column_names == list(expected[0])  # exactly the columns of --format csv
    for row, exp in zip(table.to_pylist(), expected, strict=True):
        assert row["item"] == exp["item"] and (row["error"] or "") == exp["error"]
        for key in ("score", "p_value", "class_probability"):
            assert (row[key] is None) == (exp[key] == "")
            if row[key] is not None:
                assert abs(row[key] - float(exp[key])) <= 1e-6
        assert ("" if row["ood"] is None else str(row["ood"]).lower()) == exp["ood"]
        assert (row["predicted_class"] or "") == exp["predicted_class"]
        assert "|".join(row["prediction_set"] or []) == exp["prediction_set"]
    assert len(table) == len(expected) == 303
    # A re-run resumes: every partition is there.
    code, _, err = run_cli(["score", model_dir, data / "test", "-o", tmp_path / "parts", "--engine", "ray",
                            "--chunk-size", PART], capsys)
    assert code == 3 and "0 written now, 10 already there" in err


def test_cli_score_on_ray_runs_the_models_export(cluster, data, model_dir, tmp_path, capsys):
    """``--runtime onnxruntime`` (the model's ``oodscope export``) on the actors: the local engine's rows."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'oodscope[export]')")
    import shutil

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    assert main(["export", str(model), "--format", "onnx", "--workers", "0"]) == 0
    capsys.readouterr()
    from oodscope.pipeline import OODModel

    want = OODModel.load(model, runtime="onnxruntime", progress=False, num_workers=0).predict([data / "id"])
    code, _, err = run_cli(["score", model, data / "id", "-o", tmp_path / "parts", "--engine", "ray", "--runtime",
                            "onnxruntime", "--chunk-size", PART], capsys)
    assert code == 0, err
    import pyarrow.parquet as pq

    assert_same_rows(pq.read_table(sorted((tmp_path / "parts").glob("part-*.parquet"))), want)
    # The torch runtime is another job for the same directory (its scores may differ in the last bits).
    with pytest.raises(ValueError, match="the model differ"):
        ray_engine.plan_score(model, [data / "id"], tmp_path / "parts", partition_size=PART)


def test_cli_bench_on_ray(cluster, data, tmp_path, capsys, monkeypatch):
    def bench(out, cache, *extra):
        monkeypatch.setenv("OODSCOPE_CACHE", str(cache))
        return run_cli(["bench", "--backbone", CNN, "--detectors", "msp,knn,mahalanobis", "--id", data / "id",
                        "--id-fit", data / "id", "--fit-limit", "60", "--ood", f"far:noise={data / 'test'}",
                        "--no-report", "--quiet", "--workers", "0", "-o", out, *extra], capsys)

    code, _, err = bench(tmp_path / "local", tmp_path / "cache-local")
    assert code == 0, err
    code, _, err = bench(tmp_path / "ray", tmp_path / "cache-ray", "--engine", "ray")
    assert code == 0, err
    rows = {k: json.loads((tmp_path / k / "results.json").read_text())["results"] for k in ("local", "ray")}
    assert len(rows["ray"]) == len(rows["local"]) >= 3
    for got, want in zip(rows["ray"], rows["local"], strict=True):
        assert (got["detector"], got["set"]) == (want["detector"], want["set"])
        for key in ("auroc", "fpr95", "aupr_in", "aupr_out"):
            assert abs(got[key] - want[key]) <= 1e-9, (got["detector"], key)
    # The cluster computed the features: the bench's cache holds every image of every set.
    from oodscope.backbones import create_shared

    for folder in ("id", "test"):
        again = local_extract(create_shared(CNN), resolve_images(data / folder), cache_dir=tmp_path / "cache-ray",
                              num_workers=0, progress=False)
        assert again.n_computed == 0 and again.n_cached == len(again.hashes) > 0


def test_cli_joins_the_cluster_by_address_from_another_process(cluster, data, tmp_path):
    """``oodscope extract ... --engine ray --address HOST:PORT`` in a fresh process, as a user runs it."""
    program = ("import sys, ray_tiny; ray_tiny.install(); from oodscope.cli.main import main; "
               "sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "RAY_RUNTIME_ENV_HOOK": "ray_tiny.runtime_env_hook"}
    env.pop(ray_tiny.FAULTS_ENV, None)
    done = subprocess.run([sys.executable, "-c", program, "extract", CNN, str(data / "id"), "-o",
                           str(tmp_path / "e"), "--engine", "ray", "--address", cluster.address],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "120/120 images" in done.stdout and "(120 computed" in done.stdout
    from oodscope.backbones import create_shared

    again = local_extract(create_shared(CNN), resolve_images(data / "id"), cache_dir=tmp_path / "e", num_workers=0,
                          progress=False)
    assert again.n_cached == 120 and again.n_computed == 0


def test_cli_engine_arguments_are_checked_before_any_image_is_read(data, model_dir, tmp_path, capsys, monkeypatch):
    cases = {
        "address without ray": (["extract", CNN, data / "id", "-o", tmp_path / "e", "--address", "auto"],
                                "--address: an address is for the Ray engine"),
        "malformed address": (["score", model_dir, data / "test", "-o", tmp_path / "s", "--engine", "ray",
                               "--address", "no port"], "expected auto, local, HOST:PORT"),
        "score without -o": (["score", model_dir, data / "test", "--engine", "ray"], "give -o DIR"),
        "score with --fdr": (["score", model_dir, data / "test", "-o", tmp_path / "s", "--engine", "ray", "--fdr",
                              "0.1"], "--fdr needs every p-value"),
        "score with --format csv": (["score", model_dir, data / "test", "-o", tmp_path / "s", "--engine", "ray",
                                     "--format", "csv"], "--format csv is for the local engine"),
        "bench address without ray": (["bench", "--backbone", CNN, "--id", data / "id", "--ood",
                                       f"x={data / 'test'}", "-o", tmp_path / "b", "--address", "auto"],
                                      "an address is for the Ray engine"),
    }
    import oodscope.engines.ray as module

    def refuse(*args, **kwargs):
        raise AssertionError("the Ray job started before the arguments were checked")

    monkeypatch.setattr(module, "_run", refuse)
    for name, (argv, phrase) in cases.items():
        code, _, err = run_cli(argv, capsys)
        assert code == 2 and phrase in err, (name, err)
        assert err.count("\n") == 1 and "Traceback" not in err, (name, err)
    # Ray missing: a clear message, exit 2, nothing extracted (the Python API raises EngineUnavailable).
    monkeypatch.setitem(sys.modules, "ray", None)
    for argv in (["extract", CNN, data / "id", "-o", tmp_path / "e2", "--engine", "ray"],
                 ["score", model_dir, data / "test", "-o", tmp_path / "s2", "--engine", "ray"],
                 ["bench", "--backbone", CNN, "--id", data / "id", "--ood", f"x={data / 'test'}", "-o",
                  tmp_path / "b2", "--engine", "ray"]):
        code, _, err = run_cli(argv, capsys)
        assert code == 2 and "pip install 'oodscope[ray]'" in err, err
    with pytest.raises(EngineUnavailable, match="oodscope\\[ray\\]"):
        engine_extract(CNN, data / "id", engine="ray", cache_dir=tmp_path / "c")
    assert not (tmp_path / "e2" / "items.jsonl").exists() and not (tmp_path / "s2").exists()
