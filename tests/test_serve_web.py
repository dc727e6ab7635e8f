"""The web page of ``oodscope serve`` (``oodscope/serve/web.py``, ``oodscope/serve/static/``).

In process: the page and its files are served from the package, with a Content-Security-Policy that allows
nothing but the service itself (no CDN), and stay out of the OpenAPI schema. End to end: a real uvicorn
process with a tiny calibrated model and an API key, driven by real headless Chromium (Debian's
``/usr/bin/chromium`` through playwright; never ``playwright install``): enter the key, upload an ID and
an OOD image (file picker and drag and drop), see both verdicts, open the monitoring view and see it count
the two records and the OOD rate. Screenshots go to the test's folder, and to ``$OODSCOPE_SCREENSHOT_DIR``
when that is set (``docs/img`` for the documentation).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402
from test_serve_fixtures import build_model, load_model, png, subprocess_env, test_images  # noqa: E402
from tiny_models import tiny_classifier  # noqa: E402

from oodscope.serve import create_app  # noqa: E402
from oodscope.serve.testing import ServiceProcess  # noqa: E402
from oodscope.serve.web import ASSETS, asset  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
KEY = "k-web-test-7f3a"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The tiny digits model, built once per test session (shared with test_serve_web/reliability)."""
    directory = tmp_path_factory.getbasetemp() / "serve-web-reliability-model" / "digits"
    if not (directory / "model.json").exists():
        build_model(directory)
    return directory


# --------------------------------------------------------------------------- in process
def test_page_and_assets_are_served_from_the_package_without_a_key(model_dir, tmp_path):
    from oodscope.serve.auth import ApiKey, hash_key

    keys = [ApiKey("reader", "read", hash_key(KEY))]
    app = create_app({"digits": model_dir}, store=tmp_path / "s.db", backbone=tiny_classifier, api_keys=keys)
    with TestClient(app) as client:
        root = client.get("/", follow_redirects=False)
        assert root.status_code == 307 and root.headers["location"] == "/ui/"
        page = client.get("/ui/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
        assert page.headers["x-request-id"]
        html = page.text
        for name in ASSETS:
            got = client.get(f"/ui/{name}")
            assert got.status_code == 200 and got.content == asset(name), name
            assert got.headers["content-type"].split(";")[0] == ASSETS[name].split(";")[0]
        # everything the page loads is its own: no external URL in the page, its script or its style sheet
        for text in (html, asset("app.js").decode(), asset("app.css").decode()):
            assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)
            assert "cdn" not in text.lower() and "@import" not in text
        assert client.get("/ui/secret.py").status_code == 404
        assert client.get("/ui/../app.py").status_code == 404
        paths = client.get("/openapi.json").json()["paths"]
        assert not any(p == "/" or p.startswith("/ui") for p in paths)
        assert client.get("/v1/models").status_code == 401  # the data still needs the key


# --------------------------------------------------------------------------- end to end in Chromium
def pick_images(model_dir: Path, folder: Path) -> tuple[bytes, bytes]:
    """One held-out ID digit the model accepts and one OOD image it flags (Fashion-MNIST when the Debian
    package is there, else a noise texture), chosen by ``OODModel.predict`` on the same PNG bytes."""
    ids, _ = test_images(6, 0)
    far = far_like(8, seed=-10)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, blob in enumerate(ids + far):
        paths.append(folder / f"c{i}.png")
        paths[-1].write_bytes(blob)
    results = load_model(model_dir).predict(paths, progress=False)
    accepted = [b for b, r in zip(ids, results[:len(ids)], strict=True) if r.ood is False]
    flagged = [b for b, r in zip(far, results[len(ids):], strict=True) if r.ood is True]
    assert accepted and flagged, "the tiny model should accept a held-out digit and flag an OOD image"
    return accepted[0], flagged[0]


def drop_file(page, selector: str, name: str, data: bytes) -> None:
    """A real drop event on ``selector`` carrying one file (what a drag from the desktop delivers)."""
    page.evaluate(
        """([selector, name, bytes]) => {
            const file = new File([new Uint8Array(bytes)], name, {type: "image/png"});
            const dt = new DataTransfer();
            dt.items.add(file);
            const target = document.querySelector(selector);
            for (const type of ["dragenter", "dragover", "drop"]) {
                target.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: dt}));
            }
        }""",
        [selector, name, list(data)],
    )


def keep_screenshot(path: Path) -> None:
    target = os.environ.get("OODSCOPE_SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(target) / path.name)


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is absent (Debian package chromium)")
def test_the_page_in_headless_chromium(model_dir, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the Python package playwright is not installed")
    id_png, ood_png = pick_images(model_dir, tmp_path / "candidates")
    line = subprocess.run([sys.executable, "-m", "oodscope.cli.main", "serve", "--hash-key", KEY, "--key-name",
                           "web"], capture_output=True, text=True, timeout=60, env=subprocess_env(), check=True)
    keys = tmp_path / "keys.txt"
    keys.write_text(line.stdout.strip() + "\n")
    args = [model_dir, "--store", tmp_path / "store.db", "--store-images", "--api-keys", keys,
            "--backbone-factory", "tiny_models:tiny_classifier", "--max-wait-ms", "2"]
    errors: list[str] = []
    with ServiceProcess(args, env=subprocess_env(), log_path=tmp_path / "server.log") as service, \
            sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(15_000)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" and
                    "status of 401" not in m.text else None)
            page.on("request", lambda r: errors.append(f"external request {r.url}")
                    if not r.url.startswith((service.url, "blob:", "data:")) else None)
            page.goto(service.url + "/")
            assert page.url == service.url + "/ui/#score"
            # without the key: the page asks for one
            sync_api.expect(page.locator("#notice")).to_contain_text("needs an API key")
            page.fill("#api-key", KEY)
            page.click("#key-save")
            sync_api.expect(page.locator("#model-line")).to_contain_text("knn")
            sync_api.expect(page.locator("#model-line")).to_contain_text("alpha = 0.1")
            assert page.evaluate("sessionStorage.getItem('oodscope.apiKey')") == KEY

            # the monitoring view before any image: nothing counted yet
            page.click("#tab-monitor")
            sync_api.expect(page.locator("#m-records")).to_have_text("0")
            sync_api.expect(page.locator("#chart-rate")).to_contain_text("no scored image yet")
            page.click("#tab-score")

            # an ID image through the file picker, an OOD image by drag and drop
            page.set_input_files("#files", files=[{"name": "digit.png", "mimeType": "image/png", "buffer": id_png}])
            sync_api.expect(page.locator(".result[data-verdict]")).to_have_count(1)
            drop_file(page, "#drop", "clothing.png", ood_png)
            sync_api.expect(page.locator(".result[data-verdict]")).to_have_count(2)
            id_card = page.locator(".result[data-name='digit.png']")
            ood_card = page.locator(".result[data-name='clothing.png']")
            assert id_card.get_attribute("data-verdict") == "ID"
            assert ood_card.get_attribute("data-verdict") == "OOD"
            sync_api.expect(id_card.locator(".verdict")).to_have_text("ID")
            sync_api.expect(ood_card.locator(".verdict")).to_have_text("OOD")
            for card in (id_card, ood_card):
                float(card.locator("dd.score").inner_text())
                assert 0.0 <= float(card.locator("dd.p").inner_text()) <= 1.0
                sync_api.expect(card.locator(".nomap")).to_have_text("no map")
                assert card.locator("img.thumb").evaluate("i => i.complete && i.naturalWidth > 0")
            assert id_card.locator(".chip").count() >= 1  # a non-empty prediction set for the accepted digit
            sync_api.expect(ood_card.locator("dd.set")).to_contain_text("empty")
            sync_api.expect(page.locator("#results-summary")).to_contain_text("1 scored, 1 flagged OOD")
            page.set_viewport_size({"width": 1280, "height": 520})
            page.screenshot(path=str(tmp_path / "serve_page.png"), full_page=True)
            page.set_viewport_size({"width": 1280, "height": 900})

            # the monitoring view counts both records, the OOD rate is 50 %, the flagged image is shown
            page.click("#tab-monitor")
            sync_api.expect(page.locator("#m-records")).to_have_text("2")
            sync_api.expect(page.locator("#m-flagged")).to_have_text("1")
            sync_api.expect(page.locator("#m-rate")).to_have_text("50.0 %")
            sync_api.expect(page.locator("#flagged .flag")).to_have_count(1)
            sync_api.expect(page.locator("#flagged .flag img")).to_have_count(1)
            page.wait_for_function("() => { const i = document.querySelector('#flagged .flag img');"
                                   " return i && i.complete && i.naturalWidth > 0; }")
            assert page.locator("#chart-rate svg circle").count() >= 1
            assert page.locator("#chart-hist svg rect.bar-cal").count() >= 10
            sync_api.expect(page.locator("#m-alarm")).to_have_text("quiet")

            # more traffic through the API, in rounds about 1 s apart with a rising share of OOD images:
            # the view (1 s buckets) follows it and the shift alarm goes up
            ids, _ = test_images(8, 0)
            with httpx.Client(base_url=service.url, timeout=30, headers={"Authorization": f"Bearer {KEY}"}) as c:
                for round_ in range(5):
                    blobs = ids[: 8 - 2 * round_] + far_like(2 * round_, seed=round_)
                    got = c.post("/v1/score", files=[("images", (f"r{round_}-{i}.png", b, "image/png"))
                                                     for i, b in enumerate(blobs)])
                    assert got.status_code == 200, got.text
                    time.sleep(1.05)
            page.select_option("#bucket", "1")
            sync_api.expect(page.locator("#m-records")).to_have_text("42")
            assert page.locator("#chart-rate svg circle").count() >= 3
            sync_api.expect(page.locator("#m-alarm")).to_have_text("RAISED", timeout=20_000)
            page.wait_for_function("() => [...document.querySelectorAll('#flagged .flag img')]"
                                   ".every(i => i.complete && i.naturalWidth > 0)")
            page.screenshot(path=str(tmp_path / "serve_monitor.png"), full_page=True)
        finally:
            browser.close()
    assert not errors, errors
    for name in ("serve_page.png", "serve_monitor.png"):
        assert (tmp_path / name).stat().st_size > 10_000
        keep_screenshot(tmp_path / name)


def far_like(n: int, seed: int) -> list[bytes]:
    """``n`` OOD images: Fashion-MNIST items when the Debian package is there, else noise textures."""
    if n == 0:
        return []
    fashion = fashion_images()
    if fashion is not None:
        start = 100 + 10 * seed
        return [png(x) for x in fashion[start:start + n]]
    rng = np.random.default_rng(100 + seed)
    return [png(rng.integers(0, 256, (28, 28), dtype=np.uint8)) for _ in range(n)]


@functools.cache
def fashion_images() -> np.ndarray | None:
    try:
        from oodscope.io import fashion_mnist

        return fashion_mnist("test").images[:200]
    except (FileNotFoundError, OSError):
        return None
