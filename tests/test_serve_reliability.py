"""``oodscope serve`` under load and under ``kill -9``, driven from a second process.

The load client is this file run as a script (``python tests/test_serve_reliability.py URL IMAGES OUT ...``):
threads with their own httpx connection each send two-image multipart requests with their own
``X-Request-ID`` until a request count or a time limit is reached, and write one JSON line per answer
(status, request id, record ids, ``Retry-After``) as soon as it comes, so that the lines survive the
server's death.

* overload: a server with ``--max-queue 4`` must shed (503 + ``Retry-After``, code ``overloaded``), never
  answer anything else, stay alive (``/healthz`` 200 after), and every acknowledged request (200 with
  record ids) is in the store with exactly those record ids; shed requests left no record.
* ``kill -9`` of the server in the middle of the load, on SQLite and on a throwaway PostgreSQL cluster
  (skipped, with the reason, only where its binaries are missing): no acknowledged record lost, SQLite's
  ``PRAGMA integrity_check`` is ``ok``, and the service starts again on the same store and serves.

Run with ``pytest -s`` to see the numbers (requests acknowledged, shed, lost).
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
from test_serve_fixtures import build_model, subprocess_env, test_images  # noqa: E402

from oodscope.serve.store import Store  # noqa: E402
from oodscope.serve.testing import ServiceProcess, postgres_bin  # noqa: E402

IMAGES_PER_REQUEST = 2


# --------------------------------------------------------------------------- the load client (a second process)
def run_client(url: str, images: list[bytes], out: Path, *, threads: int, max_requests: int, seconds: float,
               prefix: str) -> None:
    """Send requests from ``threads`` threads until ``max_requests`` in all or ``seconds`` have passed;
    one JSON line per answer in ``out``. A thread stops early after 10 refused connections in a row."""
    lock = threading.Lock()
    counter = {"n": 0}
    deadline = time.monotonic() + seconds
    sink = open(out, "a", buffering=1)  # noqa: SIM115 - line-buffered, closed below

    def write(line: dict) -> None:
        with lock:
            sink.write(json.dumps(line) + "\n")
            sink.flush()

    def worker(t: int) -> None:
        refused = 0
        with httpx.Client(base_url=url, timeout=httpx.Timeout(10.0, connect=2.0)) as client:
            while time.monotonic() < deadline:
                with lock:
                    if counter["n"] >= max_requests:
                        return
                    n = counter["n"]
                    counter["n"] += 1
                rid = f"{prefix}-{t}-{n}"
                blobs = [images[(n * IMAGES_PER_REQUEST + i) % len(images)] for i in range(IMAGES_PER_REQUEST)]
                started = time.monotonic()
                try:
                    r = client.post("/v1/score", headers={"X-Request-ID": rid},
                                    files=[("images", (f"{rid}-{i}.png", b, "image/png")) for i, b in enumerate(blobs)])
                except httpx.ConnectError as err:
                    write({"request_id": rid, "status": 0, "error": type(err).__name__})
                    refused += 1
                    if refused >= 10:
                        return
                    time.sleep(0.05)
                    continue
                except httpx.HTTPError as err:  # the server died mid-answer: not acknowledged
                    write({"request_id": rid, "status": 0, "error": type(err).__name__})
                    continue
                refused = 0
                line = {"request_id": rid, "status": r.status_code, "ms": (time.monotonic() - started) * 1000,
                        "retry_after": r.headers.get("retry-after"), "echo": r.headers.get("x-request-id")}
                try:
                    body = r.json()
                except ValueError:
                    body = {}
                if r.status_code == 200:
                    line["record_ids"] = [x["record_id"] for x in body["results"]]
                    line["body_request_id"] = body["request_id"]
                else:
                    line["code"] = body.get("code")
                write(line)

    pool = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join(seconds + 15)
    sink.close()


def _client_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="load client for tests/test_serve_reliability.py")
    p.add_argument("url")
    p.add_argument("images", type=Path, help="a folder of PNG files")
    p.add_argument("out", type=Path)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--max-requests", type=int, default=400)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--prefix", default="load")
    a = p.parse_args(argv)
    images = [f.read_bytes() for f in sorted(a.images.glob("*.png"))]
    run_client(a.url, images, a.out, threads=a.threads, max_requests=a.max_requests, seconds=a.seconds,
               prefix=a.prefix)
    return 0


# --------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The tiny digits model, built once per test session (shared with test_serve_web/reliability)."""
    directory = tmp_path_factory.getbasetemp() / "serve-web-reliability-model" / "digits"
    if not (directory / "model.json").exists():
        build_model(directory)
    return directory


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("load-images")
    ids, oods = test_images(8, 8)
    for i, blob in enumerate(ids + oods):
        (folder / f"{i:02d}.png").write_bytes(blob)
    return folder


def start_client(url: str, images: Path, out: Path, **options) -> subprocess.Popen:
    args = [sys.executable, __file__, url, str(images), str(out)]
    for k, v in options.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return subprocess.Popen(args, env=subprocess_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)



def read_lines(out: Path) -> list[dict]:
    if not out.exists():
        return []
    lines = []
    for text in out.read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except ValueError:  # a line cut by the end of the file
            pass
    return lines


def finish(client, timeout: float = 30.0) -> None:
    try:
        _, err = client.communicate(timeout=timeout)
    except BaseException:
        client.kill()
        client.wait(10)
        raise
    assert client.returncode == 0, err


def serve_args(model_dir: Path, store: str | Path, *extra: str) -> list:
    return [model_dir, "--store", store, "--backbone-factory", "tiny_models:tiny_classifier", *extra]


def check_acknowledged(store_spec: str | Path, answers: list[dict]) -> dict[str, int]:
    """Every 200 answer is in the store with exactly its record ids; returns the counts."""
    acked = [a for a in answers if a["status"] == 200]
    store = Store.open(store_spec)
    try:
        found = {}
        ids = [a["request_id"] for a in acked]
        for row in store.records_for(ids):
            found.setdefault(row["request_id"], []).append(row["id"])
        lost = [a["request_id"] for a in acked if sorted(found.get(a["request_id"], [])) != sorted(a["record_ids"])]
        total = store.count()
    finally:
        store.close()
    assert not lost, f"{len(lost)} acknowledged request(s) not in the store as answered: {lost[:5]}"
    return {"acknowledged": len(acked), "acknowledged_records": sum(len(a["record_ids"]) for a in acked),
            "records_in_store": total, "lost": len(lost)}


def get(url: str, path: str) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=10) as c:
        return c.get(path)


# --------------------------------------------------------------------------- overload: shed, never crash
def test_overload_sheds_with_503_and_loses_no_acknowledged_record(model_dir, image_dir, tmp_path):
    store = tmp_path / "store.db"
    out = tmp_path / "load.jsonl"
    args = serve_args(model_dir, store, "--max-queue", "4", "--max-images", "4", "--max-wait-ms", "10")
    started = time.monotonic()
    with ServiceProcess(args, env=subprocess_env(), log_path=tmp_path / "server.log") as service:
        client = start_client(service.url, image_dir, out, threads=12, max_requests=500, seconds=6, prefix="ov")
        finish(client)
        answers = read_lines(out)
        assert service.process.poll() is None, "the server died under load:\n" + service.log()[-3000:]
        assert get(service.url, "/healthz").status_code == 200
        assert get(service.url, "/readyz").json()["ready"] is True
        metrics = get(service.url, "/metrics").text
    took = time.monotonic() - started
    statuses = [a["status"] for a in answers]
    shed = [a for a in answers if a["status"] == 503]
    assert set(statuses) <= {200, 503}, sorted(set(statuses))
    assert statuses.count(200) >= 20 and len(shed) >= 5, (statuses.count(200), len(shed))
    for a in shed:
        assert a["code"] == "overloaded" and int(a["retry_after"]) >= 1, a
    for a in answers:
        assert a["echo"] == a["request_id"]  # the client's X-Request-ID is kept
        if a["status"] == 200:
            assert a["body_request_id"] == a["request_id"] and len(a["record_ids"]) == IMAGES_PER_REQUEST
    counts = check_acknowledged(store, answers)
    shed_store = Store.open(store)
    try:
        assert shed_store.records_for([a["request_id"] for a in shed]) == []  # a refused request left nothing
    finally:
        shed_store.close()
    assert counts["records_in_store"] == counts["acknowledged_records"]  # graceful stop: nothing half-answered
    counted = re.search(r'^oodscope_rejected_total\{reason="overload"\} ([0-9.e+]+)$', metrics, re.M)
    assert counted and float(counted.group(1)) == len(shed), counted
    ok = [a["ms"] for a in answers if a["status"] == 200]
    print(f"\n[overload] {len(answers)} requests ({IMAGES_PER_REQUEST} images each, 12 threads, --max-queue 4) in "
          f"{took:.1f} s: {counts['acknowledged']} acknowledged ({counts['acknowledged_records']} records), "
          f"{len(shed)} shed with 503 + Retry-After, 0 other; median acknowledged latency "
          f"{sorted(ok)[len(ok) // 2]:.0f} ms; lost {counts['lost']}; server alive, /healthz 200")


# --------------------------------------------------------------------------- kill -9 under load
def kill_under_load(model_dir: Path, image_dir: Path, tmp_path: Path, store_spec: str | Path, label: str) -> None:
    out = tmp_path / "kill.jsonl"
    args = serve_args(model_dir, store_spec, "--max-queue", "8", "--max-images", "4", "--max-wait-ms", "5")
    service = ServiceProcess(args, env=subprocess_env(), log_path=tmp_path / "server.log")
    service.start()
    client = None
    try:
        client = start_client(service.url, image_dir, out, threads=8, max_requests=2000, seconds=5, prefix="k9")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # kill once enough answers were acknowledged
            if sum(a["status"] == 200 for a in read_lines(out)) >= 40:
                break
            time.sleep(0.05)
        service.kill()  # SIGKILL in the middle of the load
        assert service.process.returncode == -9
        finish(client)
    finally:
        service.kill()
        if client is not None and client.poll() is None:
            client.kill()
            client.wait(10)
    answers = read_lines(out)
    before_kill = [a for a in answers if a["status"] == 200]
    cut = [a for a in answers if a["status"] == 0]
    assert len(before_kill) >= 40
    assert cut, "the client should have seen the server go away"
    if isinstance(store_spec, Path):
        with sqlite3.connect(store_spec) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    counts = check_acknowledged(store_spec, answers)
    assert counts["records_in_store"] >= counts["acknowledged_records"]
    # the service starts again on the same store and serves
    again = ServiceProcess(args, env=subprocess_env(), log_path=tmp_path / "server2.log")
    with again:
        ids, _ = test_images(2, 0)
        with httpx.Client(base_url=again.url, timeout=30) as c:
            r = c.post("/v1/score", files=[("images", (f"after-{i}.png", b, "image/png")) for i, b in enumerate(ids)])
            assert r.status_code == 200, r.text
            new_ids = [x["record_id"] for x in r.json()["results"]]
            summary = c.get("/v1/monitor").json()["models"][0]
            assert c.get("/readyz").json()["ready"] is True
    assert min(new_ids) > max(i for a in before_kill for i in a["record_ids"])
    assert summary["totals"]["records"] == counts["records_in_store"] + len(ids)
    if isinstance(store_spec, Path):
        with sqlite3.connect(store_spec) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    check_acknowledged(store_spec, answers)
    print(f"\n[kill -9, {label}] {len(answers)} requests (8 threads, {IMAGES_PER_REQUEST} images each): "
          f"{counts['acknowledged']} acknowledged ({counts['acknowledged_records']} records) before SIGKILL, "
          f"{len(cut)} cut or refused; after restart {counts['records_in_store']} records in the store, "
          f"lost {counts['lost']}; the restarted service served again")


def test_kill_9_under_load_sqlite(model_dir, image_dir, tmp_path):
    store = tmp_path / "store.db"
    kill_under_load(model_dir, image_dir, tmp_path, store, "SQLite")


def test_kill_9_under_load_postgresql(model_dir, image_dir, tmp_path):
    if postgres_bin() is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed: apt-get install postgresql")
    pytest.importorskip("psycopg")
    from oodscope.serve.testing import PostgresCluster

    with PostgresCluster() as cluster:
        url = cluster.create_database("reliability")
        kill_under_load(model_dir, image_dir, tmp_path, url, "PostgreSQL")


if __name__ == "__main__":
    sys.exit(_client_main(sys.argv[1:]))
