"""The FastAPI app: ``create_app(models, store=..., api_keys=..., config=...)``.

Routes (OpenAPI at ``/docs`` and ``/openapi.json``):

* ``POST /v1/score`` — images as multipart upload or JSON with base64 bodies (scope ``read``);
* ``GET /v1/model``, ``GET /v1/models`` — model cards (``read``);
* ``GET /v1/alarms``, ``GET /v1/monitor``, ``GET /v1/records/{id}/image`` — monitoring (``read``);
* ``POST /v1/admin/reload``, ``POST /v1/admin/alarms/reset`` — (``admin``);
* ``GET /healthz`` (the process answers), ``GET /readyz`` (models loaded, worker running, store
  reachable), ``GET /metrics`` (Prometheus text; ``read`` when keys are configured).

Every answer carries ``X-Request-ID``; every error is ``{"detail", "code", "request_id"}`` JSON.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import Depends, FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from oodscope import __version__
from oodscope.pipeline import OODModel
from oodscope.serve.alarms import AlarmManager, AlarmSettings
from oodscope.serve.auth import ApiKey, KeyRing, bearer_token, load_keys
from oodscope.serve.config import ServeConfig
from oodscope.serve.decode import RequestError, media_type, parse_form, parse_json_body, prepare
from oodscope.serve.engine import Engine, Job, JobTimeout, ModelFailure, Overloaded, ShuttingDown, StoreFailure
from oodscope.serve.metrics import CONTENT_TYPE, ServiceMetrics
from oodscope.serve.monitoring import summarize
from oodscope.serve.runner import ServedModel
from oodscope.serve.schemas import (
    AlarmsResponse,
    AlarmState,
    ErrorResponse,
    Health,
    ImageResult,
    ModelCard,
    ModelList,
    Ready,
    ReloadResponse,
    ScoreRequest,
    ScoreResponse,
)
from oodscope.serve.store import DEFAULT_STORE, Store, redacted
from oodscope.serve.web import mount_web

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 413, 415, 422, 503, 504)}


_bearer = HTTPBearer(auto_error=False, description="an API key (oodscope serve --hash-key makes one)")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]


def _caller(request: Request, credentials: HTTPAuthorizationCredentials | None, scope: str) -> ApiKey | None:
    ring = request.app.state.service.keys
    if not ring.enabled:
        return None
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise RequestError(401, "unauthorized", "an API key is needed: Authorization: Bearer KEY")
    key = ring.identify(credentials.credentials)
    if key is None:
        raise RequestError(401, "unauthorized", "the API key is not valid")
    if not ring.allows(key, scope):
        raise RequestError(403, "forbidden", f"the key {key.name!r} has scope {key.scope!r}; this needs {scope!r}")
    return key


def need_read(request: Request, credentials: Credentials) -> ApiKey | None:
    """Dependency: a key with scope ``read`` (or none needed when no keys are configured)."""
    return _caller(request, credentials, "read")


def need_admin(request: Request, credentials: Credentials) -> ApiKey | None:
    """Dependency: a key with scope ``admin``."""
    return _caller(request, credentials, "admin")


ReadKey = Annotated[ApiKey | None, Depends(need_read)]
AdminKey = Annotated[ApiKey | None, Depends(need_admin)]
ModelName = Annotated[str | None, Query(max_length=128, description="model name (default: the first served)")]


class Service:
    """Everything one app holds: models, store, alarms, engine, keys, metrics, settings."""

    def __init__(self, models: dict[str, ServedModel], store: Store, keys: KeyRing, config: ServeConfig) -> None:
        self.models = models
        self.default = next(iter(models))
        self.store, self.keys, self.config = store, keys, config
        self.metrics = ServiceMetrics()
        settings = AlarmSettings(delta=config.shift_delta, jump=config.shift_jump, kappas=tuple(config.shift_kappas),
                                 dedupe_window=config.shift_dedupe_window, webhook_url=config.webhook_url,
                                 webhook_timeout_s=config.webhook_timeout_s)
        self.alarms = AlarmManager(store, settings, on_webhook=lambda outcome: self.metrics.webhooks.inc(outcome))
        for served in models.values():
            self._register(served)
        self.engine = Engine(models, store, self.alarms, config, self.metrics)
        self.decode_limiter = anyio.CapacityLimiter(config.decode_threads)
        self.started_at = time.time()
        self._live_metrics()

    def _register(self, served: ServedModel) -> None:
        self.store.register_model(served.fingerprint, served.name, served.alpha, served.card(),
                                  served.calibration_scores.tolist())
        self.alarms.attach(served.name, served.fingerprint, served.calibration_scores)

    def _live_metrics(self) -> None:
        m, engine, alarms = self.metrics, self.engine, self.alarms
        m.live("oodscope_queue_images", "Images waiting for the model", (), lambda: {(): engine.queue_depth})
        m.live("oodscope_inflight_images", "Images admitted and not yet answered", (), lambda: {(): engine.inflight})
        m.live("oodscope_batch_cap_images", "Images per forward pass the batcher aims at now", (),
               lambda: {(): engine.batch_cap()})
        m.live("oodscope_queue_capacity_images", "Admission limit (images in flight)", (),
               lambda: {(): self.config.max_queue_images})
        m.live("oodscope_ood_rate", f"Fraction flagged OOD among the last {self.config.ood_rate_window} scored images",
               ("model",), lambda: {(k,): v for k, v in engine.ood_rates().items()})

        def alarm_values(field: str):
            def collect() -> dict[tuple[str, ...], float]:
                out = {}
                for name, s in alarms.states().items():
                    value = s[field]
                    out[(name,)] = float(value) if value is not None else float("nan")
                return out
            return collect

        m.live("oodscope_shift_alarm", "1 while the model's shift alarm is raised (latched until reset)", ("model",),
               alarm_values("alarm"))
        m.live("oodscope_shift_log10_martingale", "log10 of the conformal test martingale M", ("model",),
               alarm_values("log10_martingale"))
        m.live("oodscope_shift_alarm_threshold", "1/delta: the alarm fires when M reaches it", ("model",),
               alarm_values("threshold"))
        m.live("oodscope_shift_observed_images", "Images in the current test epoch", ("model",),
               alarm_values("n_observed"))
        m.live("oodscope_up_seconds", "Seconds since the service started", (),
               lambda: {(): time.time() - self.started_at})

    def pick(self, name: str | None) -> ServedModel:
        if name is None:
            return self.engine.models[self.default]
        served = self.engine.models.get(name)
        if served is None:
            served_names = ", ".join(self.engine.models)
            raise RequestError(404, "unknown_model", f"no model named {name!r}; served: {served_names}")
        return served

    def close(self) -> None:
        self.engine.stop()
        if self.alarms.webhook is not None:
            self.alarms.webhook.join(2.0)
        self.store.close()


# ------------------------------------------------------------------------------------------- models
def _served_models(models: Any, backbone: Any, device: str | None, runtime: str = "torch") -> dict[str, ServedModel]:
    if isinstance(models, str | Path | OODModel):
        models = [models]
    if isinstance(models, Mapping):
        items = list(models.items())
    elif isinstance(models, Sequence):
        items = []
        for m in models:
            name = Path(m).name if isinstance(m, str | Path) else f"model-{len(items)}"
            items.append((name, m))
    else:
        raise TypeError("models must be a model directory, an OODModel, a list of them or a {name: ...} mapping")
    if not items:
        raise ValueError("no model to serve")
    out: dict[str, ServedModel] = {}
    for name, m in items:
        if not re.match(r"^[A-Za-z0-9._-]{1,128}$", str(name)):
            raise ValueError(f"model name {name!r} must be 1-128 characters of A-Z a-z 0-9 . _ -")
        if name in out:
            raise ValueError(f"two models are named {name!r}: name them ({{'name': MODEL_DIR}} or NAME=MODEL_DIR)")
        if isinstance(m, ServedModel):
            out[name] = m
        elif isinstance(m, OODModel):
            out[name] = ServedModel.from_model(name, m)
        else:
            out[name] = ServedModel.load(name, m, backbone=backbone, device=device, runtime=runtime)
    return out


def _keyring(api_keys: Any) -> KeyRing:
    if api_keys is None:
        return KeyRing()
    if isinstance(api_keys, KeyRing):
        return api_keys
    if isinstance(api_keys, str | Path):
        return KeyRing(load_keys(api_keys))
    return KeyRing(list(api_keys))


# ------------------------------------------------------------------------------------------- ASGI guards
class Guard:
    """Outermost ASGI layer: request id, request metrics, the body limit (413 before the app reads the body), a
    key check before any body is buffered (when keys are configured), and a cap on the bytes of bodies
    being received at once (503 beyond it)."""

    def __init__(self, app: Any, service_ref: dict[str, Service]) -> None:
        self.app, self.ref = app, service_ref
        self.buffered = 0  # bytes of request bodies held right now (one event loop: no lock needed)

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001 - ASGI
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        service = self.ref["service"]
        started = time.monotonic()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given = headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status_seen = {"status": 500}

        async def send_with_id(message) -> None:  # noqa: ANN001 - ASGI
            if message["type"] == "http.response.start":
                status_seen["status"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            limit = service.config.max_body_bytes
            declared = headers.get("content-length")
            too_big = False
            if declared is not None:
                try:
                    too_big = int(declared) > limit
                except ValueError:
                    await _plain_error(send_with_id, 400, "bad_request", "Content-Length is not a number", request_id)
                    return
            if too_big:
                service.metrics.rejected.inc("too_large")
                await _plain_error(send_with_id, 413, "body_too_large",
                                   f"the request body is larger than the limit of {limit} bytes", request_id)
                return
            if scope["method"] in ("POST", "PUT", "PATCH"):
                ring = service.keys
                if ring.enabled and scope.get("path", "").startswith("/v1/"):
                    # Refuse a request without a valid key before buffering its body (scopes: in the route).
                    token = bearer_token(headers.get("authorization"))
                    if token is None or ring.identify(token) is None:
                        await _plain_error(send_with_id, 401, "unauthorized", "a valid API key is needed: "
                                           "Authorization: Bearer KEY", request_id,
                                           [(b"www-authenticate", b"Bearer")])
                        return
                chunks: list[bytes] = []
                size = 0
                try:
                    more = True
                    while more:
                        message = await receive()
                        if message["type"] == "http.disconnect":
                            return
                        chunk = message.get("body", b"")
                        more = message.get("more_body", False)
                        size += len(chunk)
                        self.buffered += len(chunk)
                        chunks.append(chunk)
                        if size > limit:
                            service.metrics.rejected.inc("too_large")
                            await _plain_error(send_with_id, 413, "body_too_large",
                                               f"the request body is larger than the limit of {limit} bytes",
                                               request_id)
                            return
                        if self.buffered > max(4 * limit, 64 * 1024 * 1024):
                            service.metrics.rejected.inc("overload")
                            await _plain_error(send_with_id, 503, "overloaded", "too many request bodies are being "
                                               "received at once; retry shortly", request_id,
                                               [(b"retry-after", b"1")])
                            return
                    body = b"".join(chunks)
                    chunks.clear()
                    replayed = {"done": False}

                    async def replay():
                        if not replayed["done"]:
                            replayed["done"] = True
                            return {"type": "http.request", "body": body, "more_body": False}
                        return await receive()

                    await self.app(scope, replay, send_with_id)
                finally:
                    self.buffered -= size
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", None) or "other"
            service.metrics.requests.inc(name, str(status_seen["status"]))
            service.metrics.latency.observe(name, value=time.monotonic() - started)


async def _plain_error(send, status: int, code: str, detail: str, request_id: str,  # noqa: ANN001
                       extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"detail": detail, "code": code, "request_id": request_id}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *(extra or [])]})
    await send({"type": "http.response.body", "body": body})


def _error(request: Request, status: int, code: str, detail: str,
           headers: dict[str, str] | None = None) -> JSONResponse:
    rid = getattr(request.state, "request_id", None)
    return JSONResponse({"detail": detail, "code": code, "request_id": rid}, status_code=status, headers=headers)


# ------------------------------------------------------------------------------------------- the app
def create_app(
    models: Any,
    *,
    store: str | Path | Store = DEFAULT_STORE,
    api_keys: Any = None,
    config: ServeConfig | None = None,
    backbone: Any = None,
    device: str | None = None,
    runtime: str = "torch",
    **settings: Any,
) -> FastAPI:
    """The scoring service for ``models``.

    Args:
        models: a saved model directory, an :class:`~oodscope.pipeline.OODModel`, a list of those (named
            by directory), or a ``{name: directory or model}`` mapping; the first is the default model.
        store: the monitoring store: a SQLite path, ``sqlite:///...`` or ``postgresql://...`` URL, or a
            :class:`~oodscope.serve.store.Store`.
        api_keys: a key file (``name:scope:sha256hex`` lines), a list of :class:`~oodscope.serve.auth.ApiKey`
            or None (no authentication).
        config: a :class:`~oodscope.serve.config.ServeConfig`; ``settings`` override its fields.
        backbone: the backbone object (or a no-argument factory) for models fitted on a backbone object.
    """
    cfg = config or ServeConfig()
    if settings:
        unknown = sorted(set(settings) - set(ServeConfig.names()))
        if unknown:
            raise TypeError(f"unknown setting(s) {', '.join(unknown)}; valid: {', '.join(ServeConfig.names())}")
        values = {name: getattr(cfg, name) for name in ServeConfig.names()} | settings
        cfg = ServeConfig(**values)
    served = _served_models(models, backbone, device, runtime)
    the_store = store if isinstance(store, Store) else Store.open(store, sync=cfg.store_sync)
    service = Service(served, the_store, _keyring(api_keys), cfg)
    ref = {"service": service}

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        service.engine.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(service.close)

    app = FastAPI(title="oodscope serve", version=__version__, lifespan=lifespan,
                  description="Is this image one the model knows? Scores, conformal p-values, OOD decisions at the "
                              "model's alpha, classes and prediction sets per image; every answer recorded; shift "
                              "alarms with a false-alarm probability of at most delta. Scores: higher = more OOD.")
    app.state.service = service
    # -------------------------------------------------------------- errors
    @app.exception_handler(RequestError)
    async def _request_error(request: Request, err: RequestError):
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        if err.status == 413:
            service.metrics.rejected.inc("too_large")
        elif err.status == 415:
            service.metrics.rejected.inc("unsupported_media_type")
        return _error(request, err.status, err.code, err.message, headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}
        return _error(request, err.status_code, codes.get(err.status_code, "error"), str(err.detail),
                      dict(err.headers) if err.headers else None)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        parts = []
        for e in err.errors()[:5]:
            where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("query", "body"))
            parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        return _error(request, 422, "invalid_request", "; ".join(parts) or "invalid request")

    # -------------------------------------------------------------- scoring
    score_body = {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["images"],
                "properties": {"images": {"type": "array", "items": {"type": "string", "format": "binary"},
                                          "minItems": 1, "maxItems": cfg.max_images_per_request,
                                          "description": "image files (any field name is accepted)"},
                               "maps": {"type": "boolean", "description": "also return anomaly maps"}}}},
            "application/json": {"schema": {"$ref": "#/components/schemas/ScoreRequest"}},
        },
    }

    @app.post("/v1/score", response_model=ScoreResponse, responses=_ERRORS, tags=["scoring"],
              openapi_extra={"requestBody": score_body},
              summary="Score one or many images: score, p-value, OOD decision, class, prediction set")
    async def score(request: Request, _key: ReadKey, model: ModelName = None,
                    maps: Annotated[bool, Query(description="also return anomaly maps (for map methods)")] = False
                    ) -> Any:
        started, wall = time.monotonic(), time.time()
        cfg_ = service.config
        served = service.pick(model)
        kind = media_type(request.headers.get("content-type"))
        if kind == "application/json":
            body = await request.body()
            uploads, options = await anyio.to_thread.run_sync(
                lambda: parse_json_body(body, max_images=cfg_.max_images_per_request), limiter=service.decode_limiter)
        elif kind == "multipart/form-data":
            try:
                form = await request.form(max_files=max(1000, cfg_.max_images_per_request + 1), max_fields=32,
                                          max_part_size=cfg_.max_body_bytes)
            except StarletteHTTPException as err:
                raise RequestError(400, "invalid_multipart", f"the multipart body cannot be parsed: {err.detail}") \
                    from None
            except Exception as err:  # noqa: BLE001 - any parser failure is the body's fault
                raise RequestError(400, "invalid_multipart", f"the multipart body cannot be parsed "
                                                             f"({type(err).__name__})") from None
            try:
                uploads, options = await parse_form(form, max_images=cfg_.max_images_per_request)
            finally:
                await form.close()
        else:
            shown = kind or "none"
            raise RequestError(415, "unsupported_media_type", f"Content-Type {shown!r} is not accepted: send "
                               "multipart/form-data (image files) or application/json (base64 images)")
        spec, keep = served.input_spec, cfg_.store_images

        def prepare_all():
            return [prepare(u, i, spec, max_pixels=cfg_.max_pixels, keep_raw=keep) for i, u in enumerate(uploads)]

        items = await anyio.to_thread.run_sync(prepare_all, limiter=service.decode_limiter)
        job = Job(model=served.name, items=items, request_id=request.state.request_id,
                  deadline=started + cfg_.request_timeout_s, maps=bool(maps or options.get("maps")),
                  received=started, received_wall=wall)
        try:
            future = service.engine.submit(job)
        except Overloaded as err:
            service.metrics.rejected.inc("overload")
            return _error(request, 503, "overloaded", str(err), {"Retry-After": str(err.retry_after)})
        except ShuttingDown as err:
            return _error(request, 503, "shutting_down", str(err), {"Retry-After": "5"})
        left = max(0.001, started + cfg_.request_timeout_s - time.monotonic())
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(future), timeout=left)
        except (asyncio.TimeoutError, JobTimeout):
            service.metrics.rejected.inc("timeout")
            return _error(request, 504, "timeout", f"the request was not done within {cfg_.request_timeout_s:g} s")
        except ModelFailure as err:
            return _error(request, 503, "model_error", str(err), {"Retry-After": "5"})
        except StoreFailure as err:
            return _error(request, 503, "store_unavailable", str(err), {"Retry-After": "5"})
        results = []
        for a in result.answers:
            amap = None
            if a.anomaly_map is not None:
                amap = {"png_base64": base64.b64encode(a.anomaly_map.png).decode(), "width": a.anomaly_map.width,
                        "height": a.anomaly_map.height, "low": a.anomaly_map.low, "high": a.anomaly_map.high}
            results.append(ImageResult(index=a.index, name=a.name, content_hash=a.content_hash, score=a.score,
                                       p_value=a.p_value, ood=a.ood, predicted_class=a.predicted_class,
                                       class_probability=a.class_probability, prediction_set=a.prediction_set,
                                       anomaly_map=amap, error=a.error, record_id=a.record_id))
        return ScoreResponse(
            request_id=request.state.request_id, model=result.model, model_fingerprint=result.fingerprint,
            alpha=result.alpha, n_images=len(results), n_errors=sum(r.error is not None for r in results),
            n_flagged=sum(bool(r.ood) for r in results), latency_ms=(time.monotonic() - started) * 1000.0,
            batch_images=result.batch_images, maps_available=served.maps_available, shift_alarm=result.alarm,
            results=results)

    # -------------------------------------------------------------- models
    @app.get("/v1/model", response_model=ModelCard, responses=_ERRORS, tags=["models"],
             summary="The model card: backbone, detector, calibration, classes, fingerprint")
    def model_card(_key: ReadKey, model: ModelName = None) -> Any:
        return service.pick(model).card()

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS, tags=["models"], summary="Every served model")
    def model_list(_key: ReadKey) -> Any:
        return {"default": service.default, "models": [m.card() for m in service.engine.models.values()]}

    # -------------------------------------------------------------- monitoring
    @app.get("/v1/alarms", response_model=AlarmsResponse, responses=_ERRORS, tags=["monitoring"],
             summary="Shift alarm state of every model and the alarm history")
    def alarm_states(_key: ReadKey, limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> Any:
        history = []
        for a in service.store.alarm_history(limit=limit):
            a = dict(a)
            a["detail"] = json.loads(a["detail"]) if a.get("detail") else {}
            history.append(a)
        states = {name: AlarmState(**s) for name, s in service.alarms.states().items()}
        return {"models": states, "history": history}

    @app.get("/v1/monitor", responses=_ERRORS, tags=["monitoring"],
             summary="OOD rate over time, scores now vs calibration, recent flagged images, alarms")
    def monitor(_key: ReadKey, model: ModelName = None,
                bucket_seconds: Annotated[float, Query(ge=1.0, le=86400.0 * 31)] = 3600.0,
                buckets: Annotated[int, Query(ge=1, le=1000)] = 24) -> dict[str, Any]:
        if model is not None:
            service.pick(model)
        return summarize(service.store, model=model, bucket_seconds=bucket_seconds, buckets=buckets)

    @app.get("/v1/records/{record_id}/image", responses=_ERRORS | {200: {"content": {"image/*": {}}}},
             response_class=Response, tags=["monitoring"], summary="The stored image of a record (when kept)")
    def record_image(record_id: int, _key: ReadKey) -> Response:
        if not -(2**63) <= record_id < 2**63:
            raise RequestError(404, "not_found", f"no stored image for record {record_id}")
        data = service.store.image(record_id)
        if data is None:
            raise RequestError(404, "not_found", f"no stored image for record {record_id} (the service keeps images "
                                                 "only with --store-images)")
        return Response(data, media_type=_sniff(data))

    # -------------------------------------------------------------- admin
    @app.post("/v1/admin/reload", response_model=ReloadResponse, responses=_ERRORS | {409: {"model": ErrorResponse}},
              tags=["admin"], summary="Reload a model from its directory (a new fingerprint starts a new test)")
    async def reload(key: AdminKey, model: ModelName = None) -> Any:
        served = service.pick(model)
        try:
            fresh = await anyio.to_thread.run_sync(served.reloaded)
        except (ValueError, OSError, ImportError, KeyError) as err:
            raise RequestError(409, "reload_failed", f"the model {served.name!r} cannot be reloaded: {err}") from None
        await anyio.to_thread.run_sync(service._register, fresh)
        service.engine.swap(fresh)
        return {"model": fresh.name, "fingerprint": fresh.fingerprint, "previous_fingerprint": served.fingerprint}

    @app.post("/v1/admin/alarms/reset", response_model=AlarmState, responses=_ERRORS, tags=["admin"],
              summary="Clear a model's shift alarm and start a new test")
    async def reset_alarm(key: AdminKey, model: ModelName = None) -> Any:
        served = service.pick(model)
        who = None if key is None else key.name
        fresh = await anyio.to_thread.run_sync(lambda: service.alarms.reset(served.name, who))
        return AlarmState(model_fingerprint=service.alarms.fingerprints[served.name], **fresh.describe())

    # -------------------------------------------------------------- operations
    @app.get("/healthz", response_model=Health, tags=["operations"], summary="The process answers")
    def healthz() -> Any:
        return {"status": "ok"}

    @app.get("/readyz", response_model=Ready, responses={503: {"model": Ready}}, tags=["operations"],
             summary="Ready to score: models loaded, worker running, store reachable")
    def readyz() -> Any:
        checks = {"models": list(service.engine.models), "worker": service.engine.alive,
                  "store": service.store.ping(), "store_url": redacted(service.store.url)}
        ready = bool(checks["models"]) and checks["worker"] and checks["store"]
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}} | _ERRORS,
             tags=["operations"], summary="Prometheus metrics")
    def metrics(request: Request, credentials: Credentials) -> Response:
        if service.config.metrics_require_key:
            _caller(request, credentials, "read")
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            extra = ScoreRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in extra.pop("$defs", {}).items():
                components.setdefault(name, sub)
            extra["properties"]["images"]["maxItems"] = service.config.max_images_per_request
            components["ScoreRequest"] = extra
            if not service.keys.enabled:  # no keys configured: no operation asks for one
                schema["components"].pop("securitySchemes", None)
                for item in schema.get("paths", {}).values():
                    for operation in item.values():
                        if isinstance(operation, dict):
                            operation.pop("security", None)
                            for status in ("401", "403"):
                                operation.get("responses", {}).pop(status, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    mount_web(app)  # the web page: GET / and /ui/ (oodscope.serve.web)
    app.add_middleware(_GuardMiddleware, service_ref=ref)
    return app


class _GuardMiddleware(Guard):
    """:class:`Guard` in the form ``add_middleware`` takes."""

    def __init__(self, app: Any, service_ref: dict[str, Service]) -> None:
        super().__init__(app, service_ref)


def _sniff(data: bytes) -> str:
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            return Image.MIME.get(im.format or "", "application/octet-stream")
    except Exception:  # noqa: BLE001 - unknown bytes are served as bytes
        return "application/octet-stream"


__all__ = ["Service", "create_app"]
