"""The served models: found in GENSERVE_MODEL_DIR, GENSERVE_WORKERS_PER_DEVICE workers per device, least-loaded routing.

:meth:`ModelRegistry.discover` reads every checkpoint's metadata and builds each model on the
"meta" device (no memory, no weights) to learn its shape and kind; any problem stops startup with
a message naming the fix. :meth:`ModelRegistry.start` then starts the workers, which load weights
and warm up on their own threads while /readyz answers 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import torch
from torch import Tensor

from models.base import RowCallback
from models.checkpoint import META, CheckpointError, read_metadata
from models.scoring.scorer import stale_calibration
from service.arrivals import Arrivals
from service.batching import BatchLimits, State, Worker
from service.compute import ComputeThread
from service.cores import CoreShare
from service.entries import ModelEntry, RegistryError, background_metadata, companion_metadata, skeleton_model
from service.errors import Timeout, Unavailable, UnknownModel
from service.jobs import EncodeTask, SampleResult, SampleTask, ScoreTask
from service.leases import lease
from service.metrics import Metrics
from service.model_server import address_from_environment
from service.settings import Settings

logger = logging.getLogger("genserve.registry")

# At shutdown, after the requests in flight (GENSERVE_SHUTDOWN_TIMEOUT_S): the longest the app waits
# for the workers' running batches to end (their threads are daemons: the process exits regardless).
WORKER_STOP_TIMEOUT_S = 10.0


class ModelRegistry:
    """Every served model and its workers."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.entries: dict[str, ModelEntry] = {}
        self.started = False
        self.arrivals = Arrivals()  # requests on their way to a worker (the batcher's wait)
        self._computes: dict[int, ComputeThread] = {}  # CPU slot -> its compute thread (service/compute.py)
        self.limits = self.batch_limits(settings)
        # The cores that CPU passes running at once share out (service/cores.py).
        self.cores = CoreShare(settings.torch_threads or torch.get_num_threads())
        self.shared_servers = False  # whether the models run in servers shared by several HTTP processes

    @staticmethod
    def batch_limits(settings: Settings) -> BatchLimits:
        """Every worker's batching limits, as the settings give them."""
        return BatchLimits(
            max_batch_size=settings.max_batch_size,
            max_batch_wait_s=settings.max_batch_wait_ms / 1000.0,
            batch_sweep=settings.batch_sweep,
            regather=settings.batch_regather,
            max_queue=settings.max_queue,
            max_concurrent_samples=settings.max_concurrent_samples,
            max_sample_batch=settings.max_sample_batch,
            warmup=settings.warmup,
            cuda_graphs=settings.cuda_graphs,
            compile=settings.compile,
            torch_threads=settings.torch_threads,
            keep_freed_memory=settings.keep_freed_memory,
        )

    # ---- startup and shutdown -----------------------------------------------------------------

    def discover(self) -> None:
        """Read the checkpoints to serve; raise RegistryError naming the fix if any is missing or broken."""
        root = self.settings.model_dir
        found = sorted(p.name for p in root.iterdir() if (p / META).is_file()) if root.is_dir() else []
        wanted = self.settings.model_names
        if wanted is None:
            if not found:
                raise RegistryError(
                    f"GENSERVE_MODEL_DIR={root} holds no checkpoints (subfolders with {META}); "
                    "train one with `genserve train` or point GENSERVE_MODEL_DIR at another folder"
                )
            wanted = found
        missing = [m for m in wanted if m not in found]
        unknown = [m for m in self.settings.model_process_names if m not in wanted]
        if unknown:
            raise RegistryError(
                f"GENSERVE_MODEL_PROCESS names {unknown}, not models served here ({wanted}); "
                'name served models, or write "true" or "false"'
            )
        if missing:
            raise RegistryError(
                f"GENSERVE_MODELS names {missing}, not checkpoints in {root}; available: {found or 'none'}"
            )
        self.entries = {name: self._entry(root / name, models=len(wanted)) for name in wanted}
        for entry in self.entries.values():
            self.describe(entry)

    def describe(self, entry: ModelEntry, *, value: float = 1.0) -> None:
        """Set (1) or clear (0, then removed) ``entry``'s genserve_model_info series."""
        info = entry.info()
        labels = (entry.name, info["kind"], info["architecture"], info["sha256"], ",".join(info["devices"]))
        if value:
            self.metrics.model_info.labels(*labels).set(value)
        else:
            with contextlib.suppress(KeyError):
                self.metrics.model_info.remove(*labels)

    def build_entry(self, folder: Path) -> ModelEntry:
        """A new entry for ``folder`` (a new version, or a new model), its workers not started;
        RegistryError if it cannot be served (service/lifecycle.py)."""
        return self._entry(folder, models=len(set(self.entries) | {folder.name}))

    def _entry(self, folder: Path, *, models: int) -> ModelEntry:
        """The entry of one model folder, its workers not yet started; RegistryError if it cannot be served."""
        name = folder.name
        try:
            meta = read_metadata(folder)
        except CheckpointError as e:
            raise RegistryError(str(e)) from e
        skeleton = skeleton_model(folder, meta)
        bg_meta = background_metadata(folder, skeleton)
        comp_meta = companion_metadata(folder, skeleton)
        devices = self.settings.worker_devices(models)
        # Under `genserve serve` with GENSERVE_HTTP_PROCESSES > 1, every model runs in a server shared by
        # the HTTP processes (service/http_processes.py), whatever GENSERVE_MODEL_PROCESS says.
        servers = [address_from_environment(name, i) for i in range(len(devices))]
        self.shared_servers = servers[0] is not None
        workers = []
        for i, dev in enumerate(devices):
            in_process = self.settings.model_process_for(
                name, steps_in_python=type(skeleton).steps_in_python, cpu_replica=dev == "cpu" and "cpu" in devices[:i]
            )
            limits = dataclasses.replace(self.limits, model_process=in_process or self.shared_servers)
            workers.append(
                Worker(
                    name=name, folder=folder, device=dev, index=i, limits=limits, metrics=self.metrics,
                    arrivals=self.arrivals, server=servers[i],
                    compute=None if limits.model_process else self._compute_for(dev, i, models=models),
                    cores=self.cores if dev == "cpu" and servers[i] is None else None,
                )
            )  # fmt: skip
        entry = ModelEntry(
            name=name, folder=folder, meta=meta, skeleton=skeleton, workers=workers, background_meta=bg_meta,
            companion_meta=comp_meta,
        )  # fmt: skip
        stale = stale_calibration(meta, bg_meta, comp_meta)
        if stale:
            raise RegistryError(
                f"{folder / META}: the outlier calibration is stale ({stale}); "
                f"rerun `genserve calibrate --model {folder}`"
            )
        for check in ("colour", "peak", "extent"):
            try:
                getattr(entry, f"{check}_check")  # parsed (and checked) once, here
            except (KeyError, TypeError, ValueError) as e:
                raise RegistryError(
                    f"{folder / META}: calibration.{check} is malformed ({e!r}); recalibrate it "
                    f"(`genserve calibrate --model {folder}`)"
                ) from e
        default = entry.default_score_type
        if default not in entry.score_types:
            raise RegistryError(
                f"{folder / META}: calibration.default_score '{default}' is not a score type of this model "
                f"({entry.score_types}); recalibrate it (`genserve calibrate --model {folder}`)"
            )
        return entry

    def start(self) -> None:
        """Start every worker thread; each loads its model and warms up in the background."""
        for worker in self.workers:
            worker.start()
        self.started = True
        logger.info("loading %d model(s) on %s", len(self.entries), ",".join(self.settings.device_list))

    async def close(self, timeout_s: float = WORKER_STOP_TIMEOUT_S) -> None:
        """Stop every worker (queued jobs get 503) and wait up to ``timeout_s`` in all for the
        batches they are running to end."""
        for worker in self.workers:
            worker.close()
        deadline = time.monotonic() + timeout_s
        for worker in self.workers:
            await asyncio.to_thread(worker.join, max(0.0, deadline - time.monotonic()))
        for compute in self._computes.values():
            compute.close()

    def _compute_for(self, device: str, index: int, *, models: int) -> ComputeThread | None:
        """The compute thread of CPU slot ``index``, shared by every model's worker there
        (service/compute.py); None where the worker computes on its own thread: on CUDA, with
        GENSERVE_CPU_COMPUTE=per_model, and with ``auto`` when one model is served (one thread,
        one pool already, without a hand-over per batch)."""
        mode = self.settings.cpu_compute
        if device != "cpu" or mode == "per_model" or (mode == "auto" and models == 1):
            return None
        if index not in self._computes:
            self._computes[index] = ComputeThread(f"genserve-compute-cpu-{index}")
        return self._computes[index]

    @property
    def workers(self) -> list[Worker]:
        return [w for e in self.entries.values() for w in e.workers]

    @property
    def devices(self) -> list[str]:
        return sorted({w.device for w in self.workers})

    @property
    def devices_in_process(self) -> list[str]:
        """The devices this process runs models on: not those of workers whose model runs in a process of
        its own or a shared server (asking torch about their memory here would start a CUDA context for nothing)."""
        return sorted({w.device for w in self.workers if w.process is None})

    # ---- readiness ----------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.started and all(w.state is State.READY for w in self.workers)

    def not_ready_reason(self) -> str:
        if not self.started:
            return "models are not loaded yet (the service is starting)"
        failed = [w for w in self.workers if w.state is State.FAILED]
        if failed:
            return "; ".join(f"model '{w.name}' failed to load on {w.device}: {w.error}" for w in failed)
        loading = [w for w in self.workers if w.state is State.LOADING]
        if loading:
            done = len(self.workers) - len(loading)
            names = sorted({w.name for w in loading})
            return f"loading models {names} ({done} of {len(self.workers)} workers ready)"
        return "shutting down"

    async def wait_loaded(self) -> None:
        """Until every worker has loaded or failed (for tests and the CLI)."""
        await asyncio.gather(*(w.loaded.wait() for w in self.workers))

    # ---- requests -----------------------------------------------------------------------------

    def get(self, name: str) -> ModelEntry:
        """The entry of model ``name`` (404 if unknown); a request on its way now counts for it."""
        if name not in self.entries:
            raise UnknownModel(f"unknown model '{name}'; available: {sorted(self.entries)}")
        self.arrivals.assign(name)
        entry = self.entries[name]
        lease(entry)  # it answers this request, and is not closed before the response ends (service/leases.py)
        return entry

    def pick(self, entry: ModelEntry) -> Worker:
        """The ready worker with the fewest queued images; of equals, the first. Under light load the
        requests keep to one worker, whose pass takes every core (service/cores.py), while the
        others stay asleep; under heavy load they spread."""
        ready = [w for w in entry.workers if w.state is State.READY]
        if not ready:
            raise Unavailable(f"model '{entry.name}' is not ready: {self.not_ready_reason()}", retry_after_s=5)
        return min(ready, key=lambda w: w.load)

    async def score(
        self, entry: ModelEntry, x: Tensor, y: Tensor | None, *, score_type: str, heatmap: bool
    ) -> dict[str, Tensor]:
        """Per-image outputs of :func:`service.scoring.compute` for x (B, C, H, W) levels, on CPU."""
        worker = self.pick(entry)
        async with self._deadline(entry):
            return await worker.run(ScoreTask(x=x, y=y, score_type=score_type, heatmap=heatmap))

    async def encode(self, entry: ModelEntry, x: Tensor) -> dict[str, Tensor]:
        """A VAE's q(z|x) for x (B, C, H, W) levels: ``mean`` and ``std``, each (B, latent_dim), on CPU."""
        worker = self.pick(entry)
        async with self._deadline(entry):
            return await worker.run(EncodeTask(x=x))

    async def sample(
        self,
        entry: ModelEntry,
        *,
        n: int,
        seed: int,
        temperature: float,
        label: int | None,
        on_row: RowCallback | None = None,
    ) -> SampleResult:
        """Draw n images on the least-loaded worker; ``on_row(rows_done, images)`` runs on its thread."""
        worker = self.pick(entry)
        task = SampleTask(n=n, seed=seed, temperature=temperature, label=label, on_row=on_row)
        async with self._deadline(entry):
            self.arrivals.leave()  # waiting for a sampling slot is not being a moment behind: batches go on
            async with worker.sample_slots:
                result = await worker.run(task)
        assert result is not None, "only a cancelled task gets None, and its caller has gone"
        return result

    @contextlib.asynccontextmanager
    async def _deadline(self, entry: ModelEntry) -> AsyncIterator[None]:
        """Cancel the body after GENSERVE_REQUEST_TIMEOUT_S (dropping its queued job) and answer 504."""
        seconds = self.settings.request_timeout_s
        try:
            async with asyncio.timeout(seconds):
                yield
        except TimeoutError as e:
            raise Timeout(
                f"model '{entry.name}' did not answer within {seconds:g} s (GENSERVE_REQUEST_TIMEOUT_S); "
                "the service is busy: retry later or send fewer images"
            ) from e
