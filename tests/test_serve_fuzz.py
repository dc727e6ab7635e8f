"""Fuzzed input for ``oodscope serve`` (bounded example counts): the request decoder and image loader never
raise on bad bytes; the app never answers 5xx to a fuzzed upload; schemathesis against the OpenAPI schema
finds no 5xx and no response that violates the schema."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_serve_fixtures import build_model, test_images  # noqa: E402
from tiny_models import tiny_classifier  # noqa: E402

from oodscope.backbones.base import InputSpec  # noqa: E402
from oodscope.serve import create_app  # noqa: E402
from oodscope.serve.auth import ApiKey, hash_key  # noqa: E402
from oodscope.serve.decode import RequestError, Upload, parse_json_body, prepare  # noqa: E402

SPEC = InputSpec(size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
FUZZ = settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def _encoded() -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for fmt, mode in (("PNG", "RGBA"), ("PNG", "I;16"), ("JPEG", "RGB"), ("GIF", "P"), ("BMP", "RGB"),
                      ("TIFF", "F"), ("WEBP", "RGB"), ("PNG", "1")):
        if mode == "I;16":
            image = Image.fromarray(rng.integers(0, 65535, (9, 7), dtype=np.uint16))
        elif mode == "F":
            image = Image.fromarray(rng.normal(size=(9, 7)).astype(np.float32))
        else:
            image = Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)).convert(mode)
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        out.append(buffer.getvalue())
    return out


ENCODED = _encoded()


@st.composite
def damaged_images(draw) -> bytes:
    """A real encoded image, then truncated, with bytes overwritten, or with junk appended."""
    data = bytearray(draw(st.sampled_from(ENCODED)))
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["cut", "flip", "append", "header"]))
        if kind == "cut" and data:
            del data[draw(st.integers(0, len(data) - 1)):]
        elif kind == "flip" and data:
            at = draw(st.integers(0, len(data) - 1))
            data[at] = draw(st.integers(0, 255))
        elif kind == "append":
            data += draw(st.binary(max_size=64))
        elif kind == "header" and len(data) > 24:
            at = draw(st.integers(8, 24))  # width/height fields of PNG/GIF/BMP headers live here
            data[at:at + 4] = draw(st.binary(min_size=4, max_size=4))
    return bytes(data)


@FUZZ
@given(st.one_of(damaged_images(), st.binary(max_size=256)))
def test_image_loader_never_raises(data):
    item = prepare(Upload("fuzz.png", data), 0, SPEC, max_pixels=1_000_000)
    if item.error is None:
        assert item.pixels.shape == (32, 32, 3) and item.pixels.dtype == np.uint8
    else:
        assert isinstance(item.error, str) and item.error and item.pixels is None
    assert item.digest is not None


json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


@FUZZ
@given(st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode()),
                 st.fixed_dictionaries({"images": st.lists(st.one_of(
                     json_values, st.fixed_dictionaries({"name": json_values, "data": st.one_of(
                         st.text(max_size=40), damaged_images().map(lambda b: base64.b64encode(b).decode()))})),
                     max_size=5)}).map(lambda v: json.dumps(v).encode())))
def test_json_decoder_raises_only_request_errors(body):
    try:
        uploads, options = parse_json_body(body, max_images=4)
    except RequestError as err:
        assert 400 <= err.status < 500 and err.message
        return
    assert 1 <= len(uploads) <= 4 and isinstance(options["maps"], bool)
    for i, upload in enumerate(uploads):
        assert isinstance(upload.name, str) and len(upload.name) <= 256
        assert (upload.data is None) == (upload.error is not None)
        prepare(upload, i, SPEC, max_pixels=1_000_000)


# --------------------------------------------------------------------------- the app under fuzz
KEY = "fuzz-admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    return create_app(build_model(root / "m"), store=root / "store.db", backbone=tiny_classifier,
                      api_keys=[ApiKey("fuzzer", "admin", hash_key(KEY))], max_body_bytes=200_000,
                      max_images_per_request=4, max_wait_ms=0.0)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app, headers=AUTH) as c:
        yield c


multipart_parts = st.lists(st.tuples(st.text(st.characters(codec="ascii", exclude_characters='"\r\n'), max_size=10),
                                     st.one_of(st.none(), st.text(max_size=12)), st.one_of(damaged_images(),
                                                                                           st.binary(max_size=64))),
                           max_size=5)


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(parts=multipart_parts, boundary=st.sampled_from(["x", "----b0undary", "a" * 70]), raw=st.binary(max_size=120),
       kind=st.sampled_from(["well-formed", "raw", "cut"]))
def test_fuzzed_uploads_never_get_5xx(client, parts, boundary, raw, kind):
    if kind == "raw":
        body = raw
    else:
        chunks = []
        for field, filename, data in parts:
            disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename is not None else "")
            chunks.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
                          "Content-Type: application/octet-stream\r\n\r\n".encode("utf-8", "replace") + data + b"\r\n")
        body = b"".join(chunks) + f"--{boundary}--\r\n".encode()
        if kind == "cut":
            body = body[: max(0, len(body) - len(raw) - 3)]
    response = client.post("/v1/score", content=body,
                           headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code < 500, response.text
    assert response.status_code in (200, 400, 413, 422), response.text
    if response.status_code == 200:
        results = response.json()["results"]
        assert all((r["error"] is None) == (r["score"] is not None) for r in results)


def test_schemathesis_finds_no_5xx_and_no_schema_violation(app):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import given as hgiven

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures, operations = [], 0
    requests = app.state.service.metrics.requests
    with TestClient(app):
        for result in schema.get_all_operations():
            operation = result.ok()
            operations += 1

            @settings(max_examples=8, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @hgiven(case=operation.as_strategy())
            def check(case):
                case.call_and_validate(headers=AUTH)

            try:
                check()
            except Exception as err:  # noqa: BLE001 - collect every operation's failure
                failures.append(f"{operation.label}: {str(err)[:1500]}")
    assert not failures, "\n\n".join(failures)
    assert operations >= 10 and sum(requests._values.values()) >= 5 * operations  # it did call every operation


def test_a_valid_image_in_json_scores(client):
    ids, _ = test_images(2, 0)
    answer = client.post("/v1/score", json={"images": [base64.b64encode(b).decode() for b in ids]})
    assert answer.status_code == 200 and answer.json()["n_errors"] == 0
