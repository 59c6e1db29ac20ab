"""The app factory: ``create_app(settings) -> FastAPI``. Models load in the lifespan, never at import.

A request enters through six middlewares (request id and log line → metrics → limit on requests
in flight → body deadline → body size limit → arrivals count, service/arrivals.py; CORS outside them
all when GENSERVE_CORS_ORIGINS is set), reaches a route in
``service/routes/``, waits in a worker's batcher (``service/batching.py``), runs on the model's
thread, and is answered by the route from the worker's tensors.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from service import images
from service.arrivals import ArrivalsMiddleware
from service.auth import require_api_key
from service.drift_monitor import DriftMonitors
from service.errors import ServiceError
from service.leases import SHA256_HEADER, VERSION_HEADER, LeaseMiddleware
from service.lifecycle import Lifecycle
from service.limits import BodySizeLimitMiddleware, BodyTimeoutMiddleware, ConcurrencyLimitMiddleware
from service.logs import RequestLogMiddleware, configure_json_logs
from service.metrics import Metrics, MetricsMiddleware
from service.openapi import install as install_openapi
from service.registry import ModelRegistry
from service.routes import admin, classify, drift, encode, health, models, sample, sample_stream, score
from service.settings import Settings
from service.watch import watching
from service.web import router as web

logger = logging.getLogger("genserve.app")

DESCRIPTION = """Sample from and score images with PixelCNN and VAE models.

Likelihoods are log-probabilities of the discrete 8-bit image in nats; bits/dim = -log2 p(x) / (C*H*W).
Every error is JSON `{"detail": ...}` saying what to change; every response has an `X-Request-ID` header.
When API keys are configured, send `Authorization: Bearer KEY` or `X-API-Key: KEY`.
"""


async def service_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


MAX_ECHO_CHARS = 200  # of a rejected input, quoted back in a 422


def _bytes_text(b: bytes) -> str:
    return b.decode("utf-8", errors="replace")


def _finite(value: Any) -> Any:
    """``value`` with every infinite or NaN float as its name ("inf", "nan"): JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def client_errors(errors: Sequence[Any]) -> list[Any]:
    """Validation errors as JSON for the client: bytes as text (undecodable bytes replaced), any
    exception in ``ctx`` as its message, non-finite numbers as names, and a rejected ``input``
    longer than MAX_ECHO_CHARS cut to that (a wrong-typed field can hold megabytes of base64 that
    the client already has)."""
    encoders: dict[Any, Callable[[Any], Any]] = {bytes: _bytes_text, BaseException: str}
    out = []
    for err in _finite(jsonable_encoder(list(errors), custom_encoder=encoders)):
        if isinstance(err, dict) and "input" in err:
            text = err["input"] if isinstance(err["input"], str) else json.dumps(err["input"])
            if len(text) > MAX_ECHO_CHARS:
                err["input"] = f"{text[:MAX_ECHO_CHARS]}... ({len(text)} characters)"
        out.append(err)
    return out


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": client_errors(exc.errors())}, status_code=422)


def include_routers(app: FastAPI, settings: Settings) -> None:
    # A request is matched against the routes in the order included, each try costing the event loop a
    # few microseconds (bench/request_overhead.py): the routes that carry the traffic come first. Without
    # GENSERVE_API_KEYS there is nothing to check, and FastAPI's solving of the key dependency and its two
    # security schemes would cost every request about a sixth of the loop's work, so it is not added.
    protected = [Depends(require_api_key)] if settings.api_key_list else []
    for router in (score.router, classify.router, sample.router, sample_stream.router, encode.router):
        app.include_router(router, dependencies=protected)
    app.include_router(health.router)  # /healthz and /readyz are open; /metrics checks keys itself
    for router in (models.router, drift.router):
        app.include_router(router, dependencies=protected)
    # Admin keys, not API keys (service/admin_auth.py); documented only where enabled (elsewhere all 403).
    app.include_router(admin.router, include_in_schema=bool(settings.admin_key_list))


def configure_process(settings: Settings) -> None:
    """The settings that hold for the whole process, not one app: Pillow's pixel limit, the
    interpreter's switch interval, torch's CPU threads, the log format."""
    images.configure_pil(settings.max_image_pixels)
    if settings.gil_switch_ms is not None:
        sys.setswitchinterval(settings.gil_switch_ms / 1000)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    if settings.json_logs:
        configure_json_logs()


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new app with its own registry and metrics; nothing loads until the lifespan starts."""
    settings = settings or Settings()
    metrics = Metrics()
    registry = ModelRegistry(settings, metrics)
    drift_monitors = DriftMonitors(settings, metrics)
    lifecycle = Lifecycle(registry, drift_monitors)
    configure_process(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry.discover()  # raises RegistryError (a clear message) for a bad configuration
        registry.start()
        if registry.shared_servers:  # loaded already in their servers (GENSERVE_HTTP_PROCESSES): connecting takes
            await registry.wait_loaded()  # milliseconds, and this process takes requests only once connected
        try:
            async with watching(lifecycle, settings.watch_interval_s):  # `genserve serve --watch`
                yield
        finally:
            await lifecycle.close()
            await registry.close()

    app = FastAPI(title="genserve", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.decode_slots = asyncio.Semaphore(settings.max_concurrent_decodes)
    app.state.registry = registry
    app.state.metrics = metrics
    app.state.drift = drift_monitors
    app.state.lifecycle = lifecycle
    app.add_exception_handler(ServiceError, service_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)

    include_routers(app, settings)
    web.install(app)  # the page at / and /static/: open, as the page asks for the key itself

    # Added innermost first: the request log wraps metrics, which wrap the limit on requests in flight,
    # the body deadline, the body size limit, and the arrivals count (POST requests on their way to a
    # worker, for the batcher's wait).
    app.add_middleware(LeaseMiddleware)  # the model version a request holds, named in X-Model-SHA256
    app.add_middleware(ArrivalsMiddleware, arrivals=registry.arrivals)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.add_middleware(BodyTimeoutMiddleware, timeout_s=settings.body_timeout_s)
    app.add_middleware(ConcurrencyLimitMiddleware, max_requests=settings.max_concurrent_requests)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestLogMiddleware)
    if settings.cors_origin_list:  # outermost, so that every answer (a 503 at the door, a 500) carries it
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "X-Seed", "Retry-After", SHA256_HEADER, VERSION_HEADER],
            max_age=600,
        )
    install_openapi(app, settings)
    return app
