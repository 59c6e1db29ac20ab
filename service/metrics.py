"""Prometheus metrics: one CollectorRegistry per app (so tests never collide) and the middleware
that counts every request by route template, model and status.

With several HTTP processes (``GENSERVE_HTTP_PROCESSES``) the supervisor sets ``PROMETHEUS_MULTIPROC_DIR``
to a fresh folder before its children import prometheus_client: every process then writes its values to
files there (prometheus_client picks its value class once, at import), and ``/metrics`` in any process
shows the aggregate of all of them: counters and histograms summed, each gauge by its ``multiprocess_mode``.
The supervisor calls :func:`mark_process_dead` when a child ends, which drops that child's ``live*`` gauges.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess, values
from prometheus_client.core import GaugeMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
WORKER = ("model", "device", "worker")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
DEVICE_MEMORY = ("genserve_device_memory_bytes", "GPU memory held by torch")

logger = logging.getLogger("genserve")


def multiprocess_dir() -> Path | None:
    """The folder every HTTP process writes its metric values to (``PROMETHEUS_MULTIPROC_DIR``) when the
    multiprocess mode is on; None when the variable is unset or empty (one process: per-app registries)."""
    folder = os.environ.get(MULTIPROC_ENV)
    return Path(folder) if folder else None


def mark_process_dead(pid: int) -> None:
    """Tell the aggregate that process ``pid`` has ended: its ``live*`` gauges (requests in flight, images
    queued, model info, ...) leave /metrics; its counters and histograms stay in the sums (they count what it
    did). prometheus_client.multiprocess.mark_process_dead on :func:`multiprocess_dir`; a no-op when unset."""
    folder = multiprocess_dir()
    if folder is not None:
        multiprocess.mark_process_dead(pid, str(folder))


def drop_dead_processes(folder: Path) -> None:
    """Mark dead every process whose ``live*`` gauge files are in ``folder`` but which has ended (an HTTP
    process that uvicorn's supervisor replaced after a crash): its requests in flight and images queued
    are no longer counted."""
    pids = {
        int(f.stem.rsplit("_", 1)[1]) for f in folder.glob("gauge_live*_*.db") if f.stem.rsplit("_", 1)[1].isdigit()
    }
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, str(folder))
        except PermissionError:
            pass  # alive, another user's


def values_in_files() -> bool:
    """Whether prometheus_client writes values to files: it decided when it was imported, from the variable."""
    return bool(getattr(values.ValueClass, "_multiprocess", False))


class RemovableGauge(Gauge):
    """A Gauge whose ``remove`` also works in the multiprocess mode. prometheus_client cannot delete a series
    from a process's file (it warns and the file keeps the last value, so a replaced model version would stay
    in /metrics), so there ``remove`` sets the series to ``removed`` instead, a value the gauge never takes
    otherwise, and :meth:`Metrics.render` leaves series at that value out of the aggregate."""

    def __init__(self, name: str, *args: Any, removed: float = math.nan, **kwargs: Any) -> None:
        super().__init__(name, *args, **kwargs)
        self.family = name
        self.removed = removed

    def remove(self, *labelvalues: Any) -> None:
        if values_in_files():
            self.labels(*labelvalues).set(self.removed)
        else:
            super().remove(*labelvalues)


def is_removed(value: float, removed: float) -> bool:
    """Whether a sample's value is a gauge's removed value (NaN equal to NaN)."""
    return value == removed or (math.isnan(removed) and math.isnan(value))


def device_memory(devices: list[str]) -> list[tuple[str, str, int]]:
    """(device, "allocated" | "reserved", bytes) of the memory torch holds in this process on each CUDA
    device in ``devices``."""
    cuda = sorted({d for d in devices if d.startswith("cuda")})
    if not cuda:
        return []
    import torch  # here, not at the top: a process that only counts requests need not load torch (~3 s)

    rows = []
    for dev in cuda:
        rows += [
            (dev, "allocated", torch.cuda.memory_allocated(dev)),
            (dev, "reserved", torch.cuda.memory_reserved(dev)),
        ]
    return rows


class AggregateCollector(multiprocess.MultiProcessCollector):
    """Every process's values in ``folder`` merged by prometheus_client's rules, less the series a
    :class:`RemovableGauge` removed (``removed``: family name -> its removed value)."""

    def __init__(self, folder: Path, removed: dict[str, float]) -> None:
        super().__init__(None, path=str(folder))
        self.removed = removed

    def collect(self) -> Iterator[Metric]:
        for family in super().collect():
            if family.name in self.removed:
                gone = self.removed[family.name]
                family.samples = [s for s in family.samples if not is_removed(s.value, gone)]
            yield family


class Families:
    """A collector of families built at scrape time."""

    def __init__(self, *families: Metric) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


class Metrics:
    """Every metric the service exports, registered in its own registry (this process's values; in the
    multiprocess mode they are also written to :func:`multiprocess_dir`, which :meth:`render` aggregates).

    Gauges' ``multiprocess_mode`` (used only in that mode; ``live*`` modes forget a process when the supervisor
    calls :func:`mark_process_dead`): what each process holds (requests in flight, images queued) is summed
    over the live processes; what each process states about the same model (its info, load time, a failed
    reload) takes the live processes' max; each process's own drift window is shown per process (a pid label).
    """

    def __init__(self) -> None:
        folder = multiprocess_dir()
        self.multiprocess_dir = folder if values_in_files() else None
        if folder is not None and self.multiprocess_dir is None:
            logger.warning(
                "%s is set but prometheus_client was imported before it was: /metrics shows this process only "
                "(set the variable before the process starts)",
                MULTIPROC_ENV,
            )
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
        # Every process serves its own requests: the service's total is the live processes' sum.
        self.in_flight = Gauge(
            "genserve_in_flight_requests", "HTTP requests being served", registry=r, multiprocess_mode="livesum"
        )
        self._worker_metrics(r)
        self._image_counters(r)
        # Every process sets the same series to 1: the max keeps it 1 (a sum would count the processes); a
        # version any live process still serves stays; removed (0) when no live process serves it.
        self.model_info = RemovableGauge(
            "genserve_model_info",
            "1 for each served model, its description in labels",
            ["model", "kind", "architecture", "sha256", "devices"],
            registry=r,
            multiprocess_mode="livemax",
            removed=0.0,
        )
        self._lifecycle_metrics(r)
        # Read at scrape time; in the multiprocess mode render reports the answering process's (never written).
        self.device_memory = Gauge(*DEVICE_MEMORY, ["device", "type"], registry=r)

    def _worker_metrics(self, r: CollectorRegistry) -> None:
        """The batching workers' queues and passes (service/batching.py)."""
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
        # Every process queues its own requests' images on its own workers: summed over the live processes.
        self.queue_images = Gauge(
            "genserve_queue_images",
            "images queued or running per worker",
            WORKER,
            registry=r,
            multiprocess_mode="livesum",
        )

    def _image_counters(self, r: CollectorRegistry) -> None:
        """Images each route handled."""
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

    def _lifecycle_metrics(self, r: CollectorRegistry) -> None:
        """Drift of the uploads (service/drift_monitor.py) and model versions (service/lifecycle.py)."""
        # Every process tests its own window of the uploads it answered: shown per process (a pid label, as
        # "liveall"), so an alert pairs a window's p-value with that window's uploads; the min or max of each
        # statistic over processes would mix windows. A reset window's series are removed (NaN, left out).
        drift: dict[str, Any] = {"registry": r, "multiprocess_mode": "liveall"}
        self.drift_uploads = RemovableGauge(
            "genserve_drift_window_uploads", "/score uploads in the drift window", ["model"], **drift
        )
        self.drift_flagged_fraction = RemovableGauge(
            "genserve_drift_flagged_fraction", "fraction of the drift window flagged as outliers", ["model"], **drift
        )
        self.drift_binomial_p = RemovableGauge(
            "genserve_drift_binomial_p_value",
            "one-sided binomial p-value of the flagged count against the calibrated false-positive rate",
            ["model"],
            **drift,
        )
        self.drift_ks_statistic = RemovableGauge(
            "genserve_drift_ks_statistic",
            "KS distance of the window's scores from the calibration scores",
            ["model"],
            **drift,
        )
        self.drift_ks_p = RemovableGauge(
            "genserve_drift_ks_p_value", "KS test p-value of the window's scores", ["model"], **drift
        )
        self.drift = RemovableGauge(
            "genserve_drift", "1 while a drift test is below GENSERVE_DRIFT_ALPHA", ["model"], **drift
        )
        self.model_reloads = Counter(
            "genserve_model_reloads",
            "model loads, reloads and unloads by result",
            ["model", "action", "result"],
            registry=r,
        )
        # Every process loads its own copy: the latest load of a live process.
        self.model_loaded_at = Gauge(
            "genserve_model_loaded_timestamp_seconds",
            "when the serving version was loaded",
            ["model"],
            registry=r,
            multiprocess_mode="livemax",
        )
        # 1 if the last reload failed in any live process (what the alert asks), 0 once all succeeded.
        self.model_reload_failed = Gauge(
            "genserve_model_reload_failed",
            "1 while the last reload or load of a model failed",
            ["model"],
            registry=r,
            multiprocess_mode="livemax",
        )

    def render(self, devices: list[str]) -> bytes:
        """The text exposition format: this app's registry after refreshing the GPU memory gauges (bytes) of
        ``devices``; in the multiprocess mode, the aggregate of every process's files in a fresh registry, plus
        this process's GPU memory."""
        memory = device_memory(devices)
        if self.multiprocess_dir is None:
            for dev, kind, held in memory:
                self.device_memory.labels(device=dev, type=kind).set(held)
            return generate_latest(self.registry)
        removed = {g.family: g.removed for g in vars(self).values() if isinstance(g, RemovableGauge)}
        family = GaugeMetricFamily(*DEVICE_MEMORY, labels=["device", "type"])
        for dev, kind, held in memory:
            family.add_metric([dev, kind], held)
        drop_dead_processes(self.multiprocess_dir)
        registry = CollectorRegistry()
        registry.register(AggregateCollector(self.multiprocess_dir, removed))
        registry.register(Families(family))
        return generate_latest(registry)

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
