"""``oodscope serve`` in process (FastAPI's TestClient): scoring equals ``OODModel.predict``, micro-batching,
overload (503 + Retry-After), timeouts (504), limits (413, 415, pixel limit), auth scopes, the store's
records, model reload, shift alarms to /metrics and to a webhook on loopback."""

from __future__ import annotations

import base64
import http.server
import json
import shutil
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402
from test_serve_fixtures import build_model, load_model, png, test_images  # noqa: E402
from tiny_models import tiny_classifier  # noqa: E402

from oodscope.serve import create_app  # noqa: E402
from oodscope.serve.auth import hash_key  # noqa: E402
from oodscope.serve.store import Store  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("api-model") / "digits")


@pytest.fixture(scope="module")
def images():
    ids, oods = test_images(6, 6)
    return ids, oods


def make_client(model_dir, tmp_path, **settings) -> TestClient:
    app = create_app({"digits": model_dir}, store=tmp_path / "store.db", backbone=tiny_classifier, **settings)
    return TestClient(app)


def files(blobs, names=None):
    names = names or [f"img{i}.png" for i in range(len(blobs))]
    return [("images", (n, b, "image/png")) for n, b in zip(names, blobs, strict=True)]


def noise_pngs(n: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [png(rng.integers(0, 256, (8, 8), dtype=np.uint8)) for _ in range(n)]


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims width x height pixels (10^10), with almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


# --------------------------------------------------------------------------- scoring equals predict
def test_scores_equal_oodmodel_predict_in_both_body_forms(model_dir, images, tmp_path):
    ids, oods = images
    blobs = ids[:3] + [b"not an image at all"] + oods + ids[3:]
    names = [f"img{i}.png" for i in range(len(blobs))]
    folder = tmp_path / "images"
    folder.mkdir()
    for name, blob in zip(names, blobs, strict=True):
        (folder / name).write_bytes(blob)
    expected = load_model(model_dir).predict([folder / n for n in names], progress=False)
    with make_client(model_dir, tmp_path, max_wait_ms=0.0) as client:
        multipart = client.post("/v1/score", files=files(blobs, names))
        as_json = client.post("/v1/score", json={"images": [{"name": n, "data": base64.b64encode(b).decode()}
                                                            for n, b in zip(names, blobs, strict=True)]})
    for response in (multipart, as_json):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["n_images"] == len(blobs) and body["n_errors"] == 1 and body["model"] == "digits"
        assert body["alpha"] == pytest.approx(0.1) and body["maps_available"] is False
        for got, want in zip(body["results"], expected, strict=True):
            assert got["name"] == Path(want.item_id).name
            if want.error is not None:
                assert got["error"] == want.error and got["score"] is None and got["ood"] is None
                continue
            assert got["error"] is None and got["anomaly_map"] is None
            assert abs(got["score"] - want.score) <= 1e-9 and abs(got["p_value"] - want.p_value) <= 1e-9
            assert got["ood"] == want.ood and got["predicted_class"] == want.predicted_class
            assert abs(got["class_probability"] - want.class_probability) <= 1e-9
            assert got["prediction_set"] == want.prediction_set
    assert [r["content_hash"] for r in multipart.json()["results"]] == \
        [r["content_hash"] for r in as_json.json()["results"]]


def test_model_card_health_readiness_docs_and_metrics(model_dir, images, tmp_path):
    with make_client(model_dir, tmp_path) as client:
        card = client.get("/v1/model").json()
        assert card["name"] == "digits" and len(card["fingerprint"]) == 16
        summary = card["summary"]
        assert summary["method"] == "knn" and summary["classes"] == ["0", "1", "2", "3", "4"]
        assert summary["backbone"]["id"] == "tiny-cnn-0" and summary["threshold"]["n"] == 100
        assert "threshold" in card["description"]
        assert client.get("/v1/models").json()["default"] == "digits"
        assert client.get("/v1/model", params={"model": "nope"}).status_code == 404
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        assert client.get("/docs").status_code == 200
        schema = client.get("/openapi.json").json()
        content = schema["paths"]["/v1/score"]["post"]["requestBody"]["content"]
        assert set(content) == {"multipart/form-data", "application/json"}
        assert "ScoreRequest" in schema["components"]["schemas"]
        client.post("/v1/score", files=files(images[0][:2] + images[1][:2]))
        text = client.get("/metrics").text
    for name in ("oodscope_requests_total", "oodscope_request_duration_seconds_bucket", "oodscope_queue_images",
                 "oodscope_ood_rate", "oodscope_shift_alarm", "oodscope_images_total"):
        assert name in text
    assert 'oodscope_requests_total{route="/v1/score",status="200"} 1' in text
    assert 'oodscope_images_total{model="digits",outcome="ok"} 4' in text


# --------------------------------------------------------------------------- bad input: 4xx, never 500
def test_limits_and_bad_bodies_get_4xx(model_dir, images, tmp_path):
    ids, _ = images
    with make_client(model_dir, tmp_path, max_body_bytes=50_000, max_images_per_request=4,
                     max_pixels=500) as client:
        big = client.post("/v1/score", files=files([b"\0" * 60_000]))
        assert big.status_code == 413 and big.json()["code"] == "body_too_large"
        many = client.post("/v1/score", files=files(ids[:5]))
        assert many.status_code == 413 and many.json()["code"] == "too_many_images"
        assert client.post("/v1/score", content=b"hello", headers={"content-type": "text/plain"}).status_code == 415
        assert client.post("/v1/score", content=b"hello").status_code == 415
        assert client.post("/v1/score", content=b"{nope", headers={"content-type": "application/json"}) \
            .status_code == 400
        assert client.post("/v1/score", json={"images": []}).status_code == 422
        assert client.post("/v1/score", json=[1, 2]).status_code == 422
        assert client.post("/v1/score", content=b"--x\r\nbroken", headers={
            "content-type": "multipart/form-data; boundary=x"}).status_code in (400, 422)
        assert client.post("/v1/score", content=b"x", headers={"content-type": "multipart/form-data"}) \
            .status_code == 400
        assert client.post("/v1/score", params={"model": "other"}, files=files(ids[:1])).status_code == 404
        # Per image: bad base64, a bomb header, more pixels than the limit — the others are scored.
        mixed = client.post("/v1/score", json={"images": [
            {"name": "ok", "data": base64.b64encode(ids[0]).decode()},
            {"name": "b64", "data": "***"},
            {"name": "bomb", "data": base64.b64encode(bomb_png()).decode()},
            {"name": "large", "data": base64.b64encode(png(np.zeros((30, 30), np.uint8))).decode()}]})
        assert mixed.status_code == 200
        results = {r["name"]: r for r in mixed.json()["results"]}
        assert results["ok"]["error"] is None and results["ok"]["score"] is not None
        assert "base64" in results["b64"]["error"]
        assert "10,000,000,000 pixels" in results["bomb"]["error"] and "limit of 500" in results["bomb"]["error"]
        assert "900 pixels" in results["large"]["error"]
        assert client.get("/readyz").status_code == 200


# --------------------------------------------------------------------------- batching, overload, timeouts
def _post_many(client, bodies, results):
    def one(i, blob):
        results[i] = client.post("/v1/score", files=files([blob]))

    threads = [threading.Thread(target=one, args=(i, b)) for i, b in enumerate(bodies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


def test_concurrent_requests_share_a_forward_pass(model_dir, images, tmp_path):
    blobs = images[0] + images[1]
    single = load_model(model_dir).predict([_write(tmp_path, i, b) for i, b in enumerate(blobs)], progress=False)
    results: dict[int, object] = {}
    with make_client(model_dir, tmp_path / "batched", max_wait_ms=150.0) as client:
        _post_many(client, blobs, results)
    sizes = [r.json()["batch_images"] for r in results.values()]
    assert all(r.status_code == 200 for r in results.values())
    assert max(sizes) > 1, sizes
    for i, want in enumerate(single):
        got = results[i].json()["results"][0]
        # Another batch composition: float32 kernels may differ in the last bits, decisions do not.
        assert got["score"] == pytest.approx(want.score, rel=1e-5) and got["ood"] == want.ood
    results.clear()
    with make_client(model_dir, tmp_path / "unbatched", batching=False) as client:
        _post_many(client, blobs[:4], results)
    assert {r.json()["batch_images"] for r in results.values()} == {1}


def _write(folder: Path, i: int, blob: bytes) -> Path:
    path = folder / f"single-{i}.png"
    path.write_bytes(blob)
    return path


class Gate:
    """Holds the model worker inside its next forward pass until opened."""

    def __init__(self, app) -> None:
        self.served = app.state.service.models["digits"]
        self.entered, self.release = threading.Event(), threading.Event()
        self.original = self.served.score

        def held(items, **kwargs):
            self.entered.set()
            self.release.wait(30)
            return self.original(items, **kwargs)

        self.served.score = held


def test_overload_is_503_with_retry_after_and_timeouts_are_504(model_dir, images, tmp_path):
    ids = images[0]
    app = create_app({"digits": model_dir}, store=tmp_path / "store.db", backbone=tiny_classifier,
                     max_queue_images=4, max_images_per_request=4, request_timeout_s=1.0, max_wait_ms=0.0)
    gate = Gate(app)
    out: dict[int, object] = {}
    with TestClient(app) as client:
        first = threading.Thread(target=lambda: out.setdefault(0, client.post("/v1/score", files=files(ids[:4]))))
        first.start()
        assert gate.entered.wait(10)
        shed = client.post("/v1/score", files=files(ids[:1]))
        assert shed.status_code == 503 and shed.json()["code"] == "overloaded"
        assert int(shed.headers["retry-after"]) >= 1
        first.join(10)
        assert out[0].status_code == 504 and out[0].json()["code"] == "timeout"  # held past its 1 s
        gate.release.set()
        deadline = time.monotonic() + 10
        while app.state.service.engine.inflight and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.post("/v1/score", files=files(ids[:2])).status_code == 200
        metrics = client.get("/metrics").text
        assert 'oodscope_rejected_total{reason="overload"} 1' in metrics
        assert client.get("/readyz").status_code == 200


# --------------------------------------------------------------------------- auth
def test_api_keys_scopes(model_dir, images, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# clients\nreader:read:{hash_key('r-secret')}\nops:admin:{hash_key('a-secret')}\n")
    app = create_app({"digits": model_dir}, store=tmp_path / "store.db", backbone=tiny_classifier, api_keys=keys)
    reader, admin = {"Authorization": "Bearer r-secret"}, {"Authorization": "Bearer a-secret"}
    with TestClient(app) as client:
        none = client.post("/v1/score", files=files(images[0][:1]))
        assert none.status_code == 401 and none.headers["www-authenticate"] == "Bearer"
        assert client.post("/v1/score", files=files(images[0][:1]),
                           headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.post("/v1/score", files=files(images[0][:1]), headers=reader).status_code == 200
        assert client.post("/v1/score", files=files(images[0][:1]), headers=admin).status_code == 200
        assert client.get("/metrics").status_code == 401 and client.get("/metrics", headers=reader).status_code == 200
        assert client.post("/v1/admin/alarms/reset", headers=reader).status_code == 403
        reset = client.post("/v1/admin/alarms/reset", headers=admin)
        assert reset.status_code == 200 and reset.json()["epoch"] == 2
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
    history = Store.open(tmp_path / "store.db").alarm_history("digits")
    assert [h["event"] for h in history] == ["reset", "started"] and json.loads(history[0]["detail"])["by"] == "ops"


# --------------------------------------------------------------------------- the store
def test_every_answer_is_a_record_and_images_are_kept_when_asked(model_dir, images, tmp_path):
    ids, oods = images
    with make_client(model_dir, tmp_path, store_images=True) as client:
        answers = [client.post("/v1/score", files=files(ids[:3] + [b"junk"])).json(),
                   client.post("/v1/score", json={"images": [base64.b64encode(b).decode() for b in oods[:2]]}).json()]
        first = answers[0]["results"][0]
        stored = client.get(f"/v1/records/{first['record_id']}/image")
        assert stored.status_code == 200 and stored.content == ids[0] and stored.headers["content-type"] == "image/png"
        assert client.get("/v1/records/999999/image").status_code == 404
        monitor = client.get("/v1/monitor").json()["models"][0]
        assert monitor["totals"]["records"] == 6 and monitor["scores"]["n_calibration"] == 100
    store = Store.open(tmp_path / "store.db")
    for answer in answers:
        rows = store.records_for([answer["request_id"]])
        assert [r["id"] for r in rows] == [r["record_id"] for r in answer["results"]]
        for row, res in zip(rows, answer["results"], strict=True):
            assert row["model"] == "digits" and row["model_fingerprint"] == answer["model_fingerprint"]
            assert row["content_hash"] == res["content_hash"] and row["error"] == res["error"]
            assert row["score"] == res["score"] and row["p_value"] == res["p_value"] and row["ood"] == res["ood"]
            assert row["predicted_class"] == res["predicted_class"] and row["latency_ms"] > 0
            assert (row["prediction_set"] is None) == (res["prediction_set"] is None)
    assert store.count() == 6
    assert store.prune(keep_records=2) == 4 and store.count() == 2


def test_reload_swaps_the_model_and_starts_a_new_test(model_dir, images, tmp_path):
    served_dir = tmp_path / "served"
    shutil.copytree(model_dir, served_dir)
    with make_client(served_dir, tmp_path) as client:
        before = client.post("/v1/score", files=files(images[1][:2])).json()
        config = json.loads((served_dir / "model.json").read_text())
        config["alpha"] = 0.2
        (served_dir / "model.json").write_text(json.dumps(config))
        reload = client.post("/v1/admin/reload", params={"model": "digits"})
        assert reload.status_code == 200, reload.text
        assert reload.json()["previous_fingerprint"] == before["model_fingerprint"] != reload.json()["fingerprint"]
        after = client.post("/v1/score", files=files(images[1][:2])).json()
        assert after["alpha"] == pytest.approx(0.2) and after["model_fingerprint"] == reload.json()["fingerprint"]
        alarms = client.get("/v1/alarms").json()
        assert alarms["models"]["digits"]["epoch"] == 2 and alarms["models"]["digits"]["n_observed"] == 2
        (served_dir / "model.json").write_text("{broken")
        failed = client.post("/v1/admin/reload")
        assert failed.status_code == 409 and failed.json()["code"] == "reload_failed"
        assert client.post("/v1/score", files=files(images[1][:1])).status_code == 200


# --------------------------------------------------------------------------- alarms to metrics and webhook
class Receiver(http.server.BaseHTTPRequestHandler):
    events: list = []

    def do_POST(self):  # noqa: N802 - http.server's name
        length = int(self.headers.get("content-length", 0))
        Receiver.events.append(json.loads(self.rfile.read(length)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def receiver():
    Receiver.events = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", Receiver.events
    server.shutdown()
    server.server_close()


def _wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def test_a_shift_raises_the_alarm_on_metrics_and_webhook_and_a_restart_keeps_it(model_dir, images, tmp_path,
                                                                                  receiver):
    url, events = receiver
    settings = {"shift_delta": 0.01, "webhook_url": url}
    with make_client(model_dir, tmp_path, **settings) as client:
        calm = client.post("/v1/score", files=files(images[0])).json()
        assert calm["shift_alarm"] is False
        raised_in = None
        for i in range(5):  # noise images: far OOD, p-values 1/101
            answer = client.post("/v1/score", files=files(noise_pngs(4, seed=i))).json()
            if answer["shift_alarm"]:
                raised_in = i
                break
        assert raised_in is not None
        metrics = client.get("/metrics").text
        assert 'oodscope_shift_alarm{model="digits"} 1' in metrics
        assert 'oodscope_shift_alarm_threshold{model="digits"} 100' in metrics
        assert _wait_for(lambda: any(e["event"] == "shift_alarm_raised" for e in events))
        event = next(e for e in events if e["event"] == "shift_alarm_raised")
        assert event["model"] == "digits" and event["alarm"] is True and event["log10_martingale"] >= 2.0
        assert event["delta"] == 0.01 and event["threshold"] == 100
        state = client.get("/v1/alarms").json()
        assert state["models"]["digits"]["alarm"] is True and state["history"][0]["event"] == "raised"
    # A new process on the same store continues the same test: still raised, same epoch and count.
    with make_client(model_dir, tmp_path, **settings) as client:
        state = client.get("/v1/alarms").json()["models"]["digits"]
        assert state["alarm"] is True and state["epoch"] == 1 and state["n_observed"] == 6 + 4 * (raised_in + 1)
        reset = client.post("/v1/admin/alarms/reset").json()
        assert reset["alarm"] is False and reset["epoch"] == 2 and reset["log10_martingale"] == pytest.approx(0.0)
        assert 'oodscope_shift_alarm{model="digits"} 0' in client.get("/metrics").text
        assert _wait_for(lambda: any(e["event"] == "shift_alarm_reset" for e in events))


def test_refused_configurations(model_dir, tmp_path):
    from oodscope.pipeline import OODModelError

    with pytest.raises(TypeError, match="unknown setting"):
        create_app(model_dir, store=tmp_path / "s.db", backbone=tiny_classifier, max_batch=3)
    with pytest.raises(ValueError, match="max_images_per_request must not exceed"):
        create_app(model_dir, store=tmp_path / "s.db", backbone=tiny_classifier, max_queue_images=2)
    uncalibrated = load_model(model_dir)
    uncalibrated.pvalues_ = None
    with pytest.raises(OODModelError, match="not calibrated"):
        create_app({"raw": uncalibrated}, store=tmp_path / "s.db")
    with pytest.raises(ValueError, match="model name"):
        create_app({"bad name!": model_dir}, store=tmp_path / "s.db", backbone=tiny_classifier)
