"""``oodscope serve`` as a real uvicorn process on a free loopback port, and the CLI around it: keys made
by ``--hash-key``, a non-loopback bind refused without keys, ``oodscope monitor`` on the store it wrote."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
from test_serve_fixtures import build_model, subprocess_env, test_images  # noqa: E402

from oodscope.cli.main import main  # noqa: E402
from oodscope.serve.testing import ServiceProcess  # noqa: E402


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "oodscope.cli.main", *args], capture_output=True, text=True,
                          input=stdin, timeout=120, env=subprocess_env(), check=False)


def test_hash_key_and_refusals(tmp_path):
    made = cli("serve", "--hash-key", "--key-name", "ops", "--scope", "admin")
    assert made.returncode == 0
    name, scope, digest = made.stdout.strip().split(":")
    assert (name, scope, len(digest)) == ("ops", "admin", 64) and "shown once" in made.stderr
    given = cli("serve", "--hash-key", "-", stdin="s3cret\n")
    assert given.stdout.strip() == "client:read:" + __import__("hashlib").sha256(b"s3cret").hexdigest()
    model = build_model(tmp_path / "m")
    refused = cli("serve", str(model), "--host", "0.0.0.0", "--port", "9")
    assert refused.returncode == 2 and "not a loopback address" in refused.stderr and "--insecure" in refused.stderr
    bad = tmp_path / "keys.txt"
    bad.write_text("ops:admin:not-a-hash\n")
    wrong = cli("serve", str(model), "--api-keys", str(bad))
    assert wrong.returncode == 2 and "keys.txt:1" in wrong.stderr and "SHA-256" in wrong.stderr
    assert cli("serve").returncode == 2 and cli("serve", str(tmp_path)).returncode == 2


def test_a_real_server_scores_records_and_stops_cleanly(tmp_path, capsys):
    model = build_model(tmp_path / "digits")
    store = tmp_path / "store.db"
    keys = tmp_path / "keys.txt"
    line = cli("serve", "--hash-key", "k-read-123", "--key-name", "reader").stdout.strip()
    keys.write_text(line + "\n")
    ids, oods = test_images(4, 4)
    args = [model, "--store", store, "--api-keys", keys, "--backbone-factory", "tiny_models:tiny_classifier",
            "--max-wait-ms", "20", "--log-level", "info"]
    service = ServiceProcess(args, env=subprocess_env(), log_path=tmp_path / "server.log")
    with service:
        auth = {"Authorization": "Bearer k-read-123"}
        with httpx.Client(base_url=service.url, timeout=30) as client:
            assert client.get("/healthz").status_code == 200
            assert client.post("/v1/score", files=[("images", ("a.png", ids[0], "image/png"))]).status_code == 401

            def one(blob):
                return client.post("/v1/score", headers=auth, files=[("images", ("x.png", blob, "image/png"))])

            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(one, ids + oods))
            assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
            big = client.post("/v1/score", headers=auth, json={"images": [base64.b64encode(b).decode()
                                                                          for b in ids + oods]})
            assert big.status_code == 200 and big.json()["n_images"] == 8
            assert client.get("/v1/model", headers=auth).json()["summary"]["method"] == "knn"
            assert "oodscope_requests_total" in client.get("/metrics", headers=auth).text
    # uvicorn finishes the admitted requests, runs the app's shutdown, then re-raises the SIGTERM it caught.
    assert service.process.returncode in (0, -15), service.log()
    assert "Application shutdown complete" in service.log()
    assert main(["monitor", str(store), "--bucket", "1h"]) == 0
    text = capsys.readouterr().out
    assert "model digits" in text and "records        16" in text and "shift alarm" in text
    assert "scores now (16 most recent) vs calibration (100)" in text and "alarm history" in text
    assert main(["monitor", str(store), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["models"][0]["totals"]["records"] == 16
    assert main(["monitor", str(tmp_path / "missing.db")]) == 2
