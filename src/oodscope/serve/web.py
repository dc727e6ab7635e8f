"""The service's web page: score images by drag and drop, watch the monitoring view.

``GET /`` redirects to ``GET /ui/``: one HTML page with its script and style sheet, all shipped in the
package (``oodscope/serve/static/``), no CDN, no external library: it works offline. The page talks only to
the service's own API (``/v1/models``, ``/v1/score``, ``/v1/monitor``, ``/v1/alarms``,
``/v1/records/{id}/image``); when the service has API keys the page asks for one and keeps it in the
browser tab's ``sessionStorage`` (sent as ``Authorization: Bearer``). The page itself needs no key: it
holds no data. Charts are inline SVG drawn by the page's own script.

``mount_web(app)`` adds the routes (kept out of the OpenAPI schema).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import RedirectResponse, Response

from oodscope.serve.decode import RequestError

# The page's files and their media types; nothing else under /ui/ is served.
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}

# Only the service itself: no CDN, no inline script; images from the API (blob:) and maps (data:).
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
                           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def asset(name: str) -> bytes:
    """The bytes of one of the page's files (``ASSETS``)."""
    if name not in ASSETS:
        raise KeyError(name)
    return resources.files("oodscope.serve").joinpath("static", name).read_bytes()


def _headers() -> dict[str, str]:
    return {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def router() -> APIRouter:
    """``/`` (a redirect) and ``/ui/`` with the page's files."""
    web = APIRouter(include_in_schema=False)
    cache: dict[str, bytes] = {}

    def serve(name: str) -> Response:
        if name not in cache:
            cache[name] = asset(name)
        return Response(cache[name], media_type=ASSETS[name], headers=_headers())

    @web.get("/")
    def root() -> Any:
        return RedirectResponse("/ui/", status_code=307)

    @web.get("/ui")
    def ui_bare() -> Any:
        return RedirectResponse("/ui/", status_code=307)

    @web.get("/ui/")
    def page() -> Response:
        return serve("index.html")

    @web.get("/ui/{name}")
    def file(name: str) -> Response:
        if name not in ASSETS:
            raise RequestError(404, "not_found", f"no file {name!r} in the web page")
        return serve(name)

    return web


def mount_web(app: FastAPI) -> FastAPI:
    """Add the web page's routes to the service ``app``."""
    app.include_router(router())
    return app


__all__ = ["ASSETS", "CONTENT_SECURITY_POLICY", "asset", "mount_web", "router"]
