"""The monitoring store on SQLite and on a real PostgreSQL server: one schema, versioned migrations, what is
committed survives ``kill -9`` of the writer, retention, and the service running on either.

The PostgreSQL server is a throwaway cluster this test starts itself (Debian's ``initdb`` / ``pg_ctl``,
on 127.0.0.1 and a free port, in a temporary directory; as root, run as the ``postgres`` user); the
tests skip, saying why, only where the server binaries are not installed.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

pytest.importorskip("sqlalchemy")
from sqlalchemy import inspect, text  # noqa: E402

from oodscope.serve.store import MIGRATIONS, SCHEMA_VERSION, Store, StoreError, schema_version  # noqa: E402
from oodscope.serve.testing import PostgresCluster, postgres_bin  # noqa: E402

TABLES = {"oodscope_schema_version", "oodscope_records", "oodscope_images", "oodscope_models", "oodscope_alarms",
          "oodscope_monitor_state", "oodscope_shift_scores"}


@pytest.fixture(scope="module")
def postgres():
    if postgres_bin() is None:
        pytest.skip("PostgreSQL server binaries are not installed (apt-get install postgresql; scripts/bootstrap.sh "
                    "installs them)")
    pytest.importorskip("psycopg")
    with PostgresCluster() as cluster:
        yield cluster


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    cluster = request.getfixturevalue("postgres")
    return cluster.create_database(f"t_{uuid.uuid4().hex[:12]}")


def record(i: int, **extra):
    row = {"time": 1000.0 + i, "request_id": f"req-{i // 3}", "item": f"img{i}.png", "model": "m",
           "model_fingerprint": "f" * 16, "content_hash": f"{i:032x}", "score": 0.1 * i, "p_value": 1 / (i + 1),
           "ood": i % 2 == 0, "predicted_class": "cat", "class_probability": 0.5, "prediction_set": '["cat"]',
           "error": None, "latency_ms": 3.5}
    row.update(extra)
    return row


def test_same_schema_and_round_trip(store_url):
    store = Store.open(store_url)
    assert store.version() == SCHEMA_VERSION
    with store.engine.connect() as conn:
        assert TABLES <= set(inspect(conn).get_table_names())
    store.register_model("f" * 16, "m", 0.1, {"method": "knn"}, [0.1, 0.2, 0.3])
    store.register_model("f" * 16, "m", 0.1, {"method": "knn"}, [0.1, 0.2, 0.3])  # idempotent
    rows = [record(i) for i in range(6)] + [record(6, score=None, p_value=None, ood=None, error="not an image")]
    ids = store.write_batch(rows, image_data=[b"png-bytes"] + [None] * 6,
                            shift_rows=[{"model": "m", "epoch": 1, "score": 0.4, "content_hash": "ab" * 16}],
                            states=[{"model": "m", "model_fingerprint": "f" * 16, "epoch": 1,
                                     "state": {"epoch": 1, "n_observed": 1}}])
    assert ids == sorted(ids) and len(set(ids)) == 7
    got = store.records_for(["req-0", "req-2"])
    assert [g["item"] for g in got] == ["img0.png", "img1.png", "img2.png", "img6.png"]
    assert got[0]["score"] == 0.0 and got[1]["p_value"] == 0.5 and got[0]["ood"] is True and got[3]["ood"] is None
    assert store.image(ids[0]) == b"png-bytes" and store.image(ids[1]) is None
    assert store.totals("m") == {"records": 7, "flagged": 3, "errors": 1, "first": 1000.0, "last": 1006.0}
    series = store.ood_rate_series("m", 3.0)
    assert [(b["n"], b["flagged"]) for b in series] == [(2, 1), (3, 2), (1, 0)]  # buckets [999, 1002), ...
    state, bag, recent = store.load_monitor("m")
    assert state["n_observed"] == 1 and bag == [0.4] and recent == [bytes.fromhex("ab" * 16)]
    assert store.served_models()[0]["calibration_scores"] == [0.1, 0.2, 0.3]
    assert store.prune(older_than=1003.0) == 3 and store.count() == 4 and store.image(ids[0]) is None
    store.close()


def test_migrations_upgrade_an_old_store_and_refuse_a_newer_one(store_url):
    old = Store.open(store_url, target=1)
    assert old.version() == 1
    with old.engine.connect() as conn:
        assert "oodscope_alarms" not in inspect(conn).get_table_names()
    old.write_batch([record(0)])
    old.close()
    upgraded = Store.open(store_url)
    assert upgraded.version() == SCHEMA_VERSION and upgraded.count() == 1
    assert upgraded.migrate() == []  # nothing left to do
    with upgraded.engine.begin() as conn:
        applied = conn.execute(text(f"SELECT version FROM {schema_version.name} ORDER BY version")).scalars().all()
        assert applied == [m.version for m in MIGRATIONS]
        conn.execute(schema_version.insert().values(version=SCHEMA_VERSION + 1, description="future", applied_at=0.0))
    upgraded.close()
    with pytest.raises(StoreError, match="newer than this oodscope knows"):
        Store.open(store_url)


WRITER = textwrap.dedent("""
    import os, sys, time
    from oodscope.serve.store import Store
    store = Store.open(sys.argv[1], sync=sys.argv[2])
    n = 0
    while True:
        rows = [{"time": time.time(), "request_id": f"r{n}", "item": f"i{n}-{k}", "model": "m",
                 "model_fingerprint": "f", "score": float(n), "p_value": 0.5, "ood": False} for k in range(5)]
        store.write_batch(rows)
        print(n, flush=True)  # acknowledged only after the commit returned
        n += 1
""")


def test_kill_9_loses_no_committed_batch(store_url, tmp_path):
    kill_writer_and_check(store_url, tmp_path, "full")


def test_kill_9_loses_nothing_with_sync_normal_either(tmp_path):
    kill_writer_and_check(f"sqlite:///{tmp_path / 'normal.db'}", tmp_path, "normal")


def kill_writer_and_check(store_url, tmp_path, sync):
    Store.open(store_url).close()
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    child = subprocess.Popen([sys.executable, str(script), store_url, sync], stdout=subprocess.PIPE, text=True,
                             stdin=subprocess.DEVNULL)
    acknowledged = []
    try:
        deadline = time.monotonic() + 20
        while len(acknowledged) < 30 and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            acknowledged.append(int(line))
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        child.stdout.close()
    assert len(acknowledged) >= 10
    store = Store.open(store_url)
    found = {r["request_id"] for r in store.recent(limit=100_000)}
    assert {f"r{n}" for n in acknowledged} <= found
    for n in acknowledged:  # whole transactions: 5 records each
        assert len(store.records_for([f"r{n}"])) == 5
    store.close()
    if store_url.startswith("sqlite"):
        path = store_url.split("sqlite:///", 1)[1]
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_service_on_postgresql_records_and_restores(postgres, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from test_serve_fixtures import build_model, test_images
    from tiny_models import tiny_classifier

    from oodscope.serve import create_app

    url = postgres.create_database(f"svc_{uuid.uuid4().hex[:8]}")
    model = build_model(tmp_path / "m")
    ids, oods = test_images(4, 4)
    with TestClient(create_app(model, store=url, backbone=tiny_classifier)) as client:
        answer = client.post("/v1/score", files=[("images", (f"{i}.png", b, "image/png"))
                                                 for i, b in enumerate(ids + oods)]).json()
        assert answer["n_images"] == 8 and client.get("/readyz").json()["checks"]["store"] is True
        assert "postgresql" in client.get("/readyz").json()["checks"]["store_url"]
    with TestClient(create_app(model, store=url, backbone=tiny_classifier)) as client:
        assert client.get("/v1/alarms").json()["models"]["m"]["n_observed"] == 8
        summary = client.get("/v1/monitor").json()["models"][0]
        assert summary["totals"]["records"] == 8 and summary["alarm"]["epoch"] == 1
    store = Store.open(url)
    rows = store.records_for([answer["request_id"]])
    assert [r["score"] for r in rows] == [r["score"] for r in answer["results"]]
    assert json.loads(rows[0]["prediction_set"]) == answer["results"][0]["prediction_set"]
    store.close()
