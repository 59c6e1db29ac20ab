"""Prometheus metrics: one CollectorRegistry per app (so tests never collide) and the middleware
that counts every request by route template, model and status."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
WORKER = ("model", "device", "worker")


class Metrics:
    """Every metric the service exports, registered in its own registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "genserve_requests",
            "HTTP requests by route template, model and status",
            ["route", "model", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "genserve_request_seconds",
            "HTTP request latency",
            ["route", "model", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("genserve_in_flight_requests", "HTTP requests being served", registry=r)
        self.queue_wait = Histogram(
            "genserve_queue_wait_seconds",
            "time a job waited before its forward pass (for its batch to form and for the device's compute thread)",
            WORKER,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_images = Histogram(
            "genserve_batch_images", "images per forward pass", [*WORKER, "op"], buckets=BATCH_BUCKETS, registry=r
        )
        self.inference_seconds = Histogram(
            "genserve_inference_seconds",
            "time of one batched pass (a generation's includes the turns it gives other models' batches on a CPU)",
            [*WORKER, "op"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_images = Gauge("genserve_queue_images", "images queued or running per worker", WORKER, registry=r)
        self.outliers = Counter(
            "genserve_outliers_flagged", "images flagged as outliers", ["model", "score_type"], registry=r
        )
        self.images_scored = Counter("genserve_images_scored", "images scored", ["model", "score_type"], registry=r)
        self.images_sampled = Counter("genserve_images_sampled", "images drawn", ["model"], registry=r)
        self.images_classified = Counter(
            "genserve_images_classified", "images classified by /classify", ["model"], registry=r
        )
        self.classify_refused = Counter(
            "genserve_classify_refused",
            "images /classify refused (p(x) failed the outlier test)",
            ["model"],
            registry=r,
        )
        self.images_encoded = Counter("genserve_images_encoded", "images encoded by /encode", ["model"], registry=r)
        self.model_info = Gauge(
            "genserve_model_info",
            "1 for each served model, its description in labels",
            ["model", "kind", "architecture", "sha256", "devices"],
            registry=r,
        )
        self._lifecycle_metrics(r)
        self.device_memory = Gauge(
            "genserve_device_memory_bytes", "GPU memory held by torch", ["device", "type"], registry=r
        )

    def _lifecycle_metrics(self, r: CollectorRegistry) -> None:
        """Drift of the uploads (service/drift_monitor.py) and model versions (service/lifecycle.py)."""
        self.drift_uploads = Gauge(
            "genserve_drift_window_uploads", "/score uploads in the drift window", ["model"], registry=r
        )
        self.drift_flagged_fraction = Gauge(
            "genserve_drift_flagged_fraction", "fraction of the drift window flagged as outliers", ["model"], registry=r
        )
        self.drift_binomial_p = Gauge(
            "genserve_drift_binomial_p_value",
            "one-sided binomial p-value of the flagged count against the calibrated false-positive rate",
            ["model"],
            registry=r,
        )
        self.drift_ks_statistic = Gauge(
            "genserve_drift_ks_statistic",
            "KS distance of the window's scores from the calibration scores",
            ["model"],
            registry=r,
        )
        self.drift_ks_p = Gauge(
            "genserve_drift_ks_p_value", "KS test p-value of the window's scores", ["model"], registry=r
        )
        self.drift = Gauge(
            "genserve_drift", "1 while a drift test is below GENSERVE_DRIFT_ALPHA", ["model"], registry=r
        )
        self.model_reloads = Counter(
            "genserve_model_reloads",
            "model loads, reloads and unloads by result",
            ["model", "action", "result"],
            registry=r,
        )
        self.model_loaded_at = Gauge(
            "genserve_model_loaded_timestamp_seconds", "when the serving version was loaded", ["model"], registry=r
        )
        self.model_reload_failed = Gauge(
            "genserve_model_reload_failed", "1 while the last reload or load of a model failed", ["model"], registry=r
        )

    def render(self, devices: list[str]) -> bytes:
        """The text exposition format, after refreshing GPU memory gauges."""
        for dev in sorted({d for d in devices if d.startswith("cuda")}):
            self.device_memory.labels(device=dev, type="allocated").set(torch.cuda.memory_allocated(dev))
            self.device_memory.labels(device=dev, type="reserved").set(torch.cuda.memory_reserved(dev))
        return generate_latest(self.registry)

    def sample_value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A metric's current value (0 when absent); for tests and benchmarks."""
        value = self.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value


def route_template(scope: Scope) -> str:
    """The matched route's path template ("/models/{name}"), so labels stay few; else "unmatched"."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class MetricsMiddleware:
    """Counts requests and their latency; the route handler names the model in ``request.state.model``."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})
        status = 500  # unless the app answers

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_wrapper)
        except asyncio.CancelledError:
            status = 499  # the client went away (nginx's code for it)
            raise
        finally:
            self.metrics.in_flight.dec()
            labels = {"route": route_template(scope), "model": str(state.get("model", "")), "status": str(status)}
            self.metrics.requests.labels(**labels).inc()
            self.metrics.request_seconds.labels(**labels).observe(time.perf_counter() - start)
