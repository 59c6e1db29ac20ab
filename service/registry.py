"""The served models: found in GENSERVE_MODEL_DIR, one worker per (model, device), least-loaded routing.

:meth:`ModelRegistry.discover` reads every checkpoint's metadata and builds each model on the
"meta" device (no memory, no weights) to learn its shape and kind; any problem stops startup with
a message naming the fix. :meth:`ModelRegistry.start` then starts the workers, which load weights
and warm up on their own threads while /readyz answers 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from models.base import AutoregressiveModel, DensityModel, RowCallback
from models.checkpoint import META, CheckpointError, build_model, read_metadata
from models.classify import training_prior
from models.outliers import BACKGROUND, available_score_types, stale_calibration
from service import scoring
from service.arrivals import Arrivals
from service.batching import BatchLimits, SampleResult, State, Worker
from service.compute import ComputeThread
from service.errors import BadRequest, Timeout, Unavailable, UnknownModel
from service.metrics import Metrics
from service.settings import Settings

logger = logging.getLogger("genserve.registry")

# At shutdown, after the requests in flight (GENSERVE_SHUTDOWN_TIMEOUT_S): the longest the app waits
# for the workers' running batches to end (their threads are daemons: the process exits regardless).
WORKER_STOP_TIMEOUT_S = 10.0


class RegistryError(ValueError):
    """The configured models cannot be served; the message says how to fix the settings."""


@dataclass
class ModelEntry:
    """One served model: what its checkpoint says, and its workers."""

    name: str
    folder: Path
    meta: dict[str, Any]
    skeleton: DensityModel  # built on the "meta" device: properties only, no weights
    workers: list[Worker]
    background_meta: dict[str, Any] | None = None  # the background model in <folder>/background/, if any

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.skeleton.shape

    @property
    def levels(self) -> int:
        return self.skeleton.levels

    @property
    def dims(self) -> int:
        return self.skeleton.dims

    @property
    def n_classes(self) -> int | None:
        return self.skeleton.n_classes

    @property
    def per_pixel(self) -> bool:
        """True if the model gives per-pixel likelihoods (heatmaps)."""
        return isinstance(self.skeleton, AutoregressiveModel)

    @property
    def classes(self) -> list[str] | None:
        classes = (self.meta.get("dataset") or {}).get("classes")
        return [str(c) for c in classes] if classes else None

    @property
    def prior(self) -> list[float]:
        """p(y) of a class-conditional model: its training class frequencies (uniform if unrecorded)."""
        assert self.n_classes is not None
        return [float(p) for p in training_prior(self.meta, self.n_classes)]

    @property
    def score_types(self) -> list[str]:
        return available_score_types(
            has_background=self.background_meta is not None, has_dose=scoring.has_dose(self.meta)
        )

    @property
    def default_score_type(self) -> str:
        return scoring.default_score_type(self.meta, background=self.background_meta is not None)

    def info(self) -> dict[str, Any]:
        dataset = self.meta.get("dataset") or {}
        return {
            "name": self.name,
            "kind": self.skeleton.kind,
            "architecture": self.skeleton.architecture,
            "shape": list(self.shape),
            "levels": self.levels,
            "dataset": dataset.get("name") or dataset.get("spec"),
            "classes": self.classes,
            "metrics": self.meta.get("metrics") or {},
            "calibration": self.meta.get("calibration") or None,
            "sha256": self.meta["weights"].get("sha256", ""),
            "devices": [w.device for w in self.workers],
            "exact_likelihood": bool(self.skeleton.exact),
            "conditional": self.n_classes is not None,
            "score_types": self.score_types,
            "default_score_type": self.default_score_type,
            "background": None if self.background_meta is None else background_info(self.background_meta),
        }

    def label_index(self, label: int | str | None, *, required: bool = True) -> int | None:
        """The class index for a request's label (a name or an index); 422 unless it fits the model
        (or, with ``required``, if a class-conditional model gets none)."""
        n = self.n_classes
        if n is None:
            if label is not None:
                raise BadRequest(f"model '{self.name}' is not class-conditional; remove 'label'")
            return None
        names = self.classes
        choices = f"one of {names} or an index 0..{n - 1}" if names else f"an index 0..{n - 1}"
        if label is None:
            if not required:
                return None
            raise BadRequest(f"model '{self.name}' is class-conditional; send 'label': {choices}")
        if isinstance(label, str):
            if names and label in names:
                return names.index(label)
            text = label.strip()
            if not (text.isascii() and text.isdigit()):  # "³" and "٣" are digits to str.isdigit
                raise BadRequest(f"label '{label}' is not a class of model '{self.name}'; send {choices}")
            label = int(text)
        if not 0 <= label < n:
            raise BadRequest(f"label {label} is out of range for model '{self.name}'; send {choices}")
        return label

    def resolve_score_type(self, requested: str | None) -> str:
        name = requested or self.default_score_type
        if name not in self.score_types:
            raise BadRequest(f"unknown score_type '{name}'; model '{self.name}' offers {self.score_types}")
        return name


def background_info(meta: dict[str, Any]) -> dict[str, Any]:
    """What /models says about a background model: architecture, size, perturbation, weights."""
    return {
        "architecture": meta.get("architecture"),
        "parameters": meta.get("parameters"),
        "perturb": (meta.get("dataset") or {}).get("perturb"),
        "sha256": meta["weights"].get("sha256", ""),
    }


def skeleton_model(folder: Path, meta: dict[str, Any]) -> DensityModel:
    """The model built from its config on the meta device: checks the config, costs no memory."""
    try:
        with torch.device("meta"):
            return build_model(meta["architecture"], meta["config"])
    except (TypeError, ValueError) as e:
        raise RegistryError(f"{folder / META}: config does not build a model: {e}") from e


def background_metadata(folder: Path, skeleton: DensityModel) -> dict[str, Any] | None:
    """The metadata of ``folder``'s background model, None if it has none; RegistryError unless the
    background takes the model's images and is unconditional."""
    if not scoring.has_background(folder):
        return None
    bg_folder = folder / BACKGROUND
    try:
        meta = read_metadata(bg_folder)
    except CheckpointError as e:
        raise RegistryError(str(e)) from e
    bg = skeleton_model(bg_folder, meta)
    if bg.shape != skeleton.shape or bg.levels != skeleton.levels or bg.n_classes is not None:
        raise RegistryError(
            f"{bg_folder / META}: the background model takes {bg.shape} images with {bg.levels} levels"
            f"{' and labels' if bg.n_classes is not None else ''}; its model takes {skeleton.shape} with "
            f"{skeleton.levels}, unconditionally. Retrain it for this model or remove {bg_folder}"
        )
    return meta


class ModelRegistry:
    """Every served model and its workers."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.entries: dict[str, ModelEntry] = {}
        self.started = False
        self._round_robin = itertools.count()
        self.arrivals = Arrivals()  # requests on their way to a worker (the batcher's wait)
        self._computes: dict[int, ComputeThread] = {}  # CPU slot -> its compute thread (service/compute.py)
        self.limits = BatchLimits(
            max_batch_size=settings.max_batch_size,
            max_batch_wait_s=settings.max_batch_wait_ms / 1000.0,
            max_queue=settings.max_queue,
            max_concurrent_samples=settings.max_concurrent_samples,
            max_sample_batch=settings.max_sample_batch,
            warmup=settings.warmup,
            cuda_graphs=settings.cuda_graphs,
            torch_threads=settings.torch_threads,
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
        if missing:
            raise RegistryError(
                f"GENSERVE_MODELS names {missing}, not checkpoints in {root}; available: {found or 'none'}"
            )
        devices = self.settings.device_list
        entries = {}
        for name in wanted:
            folder = root / name
            try:
                meta = read_metadata(folder)
            except CheckpointError as e:
                raise RegistryError(str(e)) from e
            skeleton = skeleton_model(folder, meta)
            bg_meta = background_metadata(folder, skeleton)
            workers = [
                Worker(
                    name=name,
                    folder=folder,
                    device=dev,
                    index=i,
                    limits=self.limits,
                    metrics=self.metrics,
                    arrivals=self.arrivals,
                    compute=self._compute_for(dev, i, models=len(wanted)),
                )
                for i, dev in enumerate(devices)
            ]
            entry = ModelEntry(
                name=name, folder=folder, meta=meta, skeleton=skeleton, workers=workers, background_meta=bg_meta
            )
            stale = stale_calibration(meta, bg_meta)
            if stale:
                raise RegistryError(
                    f"{folder / META}: the outlier calibration is stale ({stale}); "
                    f"rerun `genserve calibrate --model {folder}`"
                )
            default = entry.default_score_type
            if default not in entry.score_types:
                raise RegistryError(
                    f"{folder / META}: calibration.default_score '{default}' is not a score type of this model "
                    f"({entry.score_types}); recalibrate it (`genserve calibrate --model {folder}`)"
                )
            entries[name] = entry
        self.entries = entries
        for entry in entries.values():
            info = entry.info()
            self.metrics.model_info.labels(
                model=entry.name,
                kind=info["kind"],
                architecture=info["architecture"],
                sha256=info["sha256"],
                devices=",".join(info["devices"]),
            ).set(1)

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
        return self.entries[name]

    def pick(self, entry: ModelEntry) -> Worker:
        """The ready worker with the fewest queued images; ties rotate."""
        ready = [w for w in entry.workers if w.state is State.READY]
        if not ready:
            raise Unavailable(f"model '{entry.name}' is not ready: {self.not_ready_reason()}", retry_after_s=5)
        k = next(self._round_robin) % len(ready)
        return min(ready[k:] + ready[:k], key=lambda w: w.load)

    async def score(
        self, entry: ModelEntry, x: Tensor, y: Tensor | None, *, score_type: str, heatmap: bool
    ) -> dict[str, Tensor]:
        """Per-image outputs of :func:`service.scoring.compute` for x (B, C, H, W) levels, on CPU."""
        worker = self.pick(entry)
        payload = {"x": x, "y": y}
        key = ("score", score_type, heatmap, y is None)  # labelled and unlabelled images never share a pass
        async with self._deadline(entry):
            result: dict[str, Tensor] = await worker.run("score", key, x.shape[0], payload)
        return result

    async def encode(self, entry: ModelEntry, x: Tensor) -> dict[str, Tensor]:
        """A VAE's q(z|x) for x (B, C, H, W) levels: ``mean`` and ``std``, each (B, latent_dim), on CPU."""
        worker = self.pick(entry)
        async with self._deadline(entry):
            result: dict[str, Tensor] = await worker.run("encode", ("encode",), x.shape[0], {"x": x})
        return result

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
        payload = {"seed": seed, "temperature": temperature, "label": label, "on_row": on_row}
        async with self._deadline(entry):
            self.arrivals.leave()  # waiting for a sampling slot is not being a moment behind: batches go on
            async with worker.sample_slots:
                result: SampleResult = await worker.run("sample", ("sample",), n, payload)
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
