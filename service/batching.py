"""One worker per (model, device): a thread that owns the model and a dynamic batcher in front of it.

Requests wait here. The event loop submits a :class:`Job` and awaits its future; the worker thread
takes the oldest job, gathers queued jobs with the same key (op, score type, heatmap) up to
``max_batch_size`` images, waiting up to ``max_batch_wait_ms`` after the first one arrived for more
but only while other requests are on their way to this model (service/arrivals.py), runs one
forward pass for all of them (a CPU worker on the compute thread its slot shares with the other
models' workers, service/compute.py), splits the outputs back, and resolves each future on the loop.

Sampling jobs that wait together run as one batched generation (up to ``max_sample_batch`` images);
each keeps its own seed, temperature and label, so its images are the ones it would get alone. A job
whose request was cancelled (client gone, timeout) is removed from the queue and never computed, and
a sampling job cancelled mid-generation leaves its batch after the current row. The
queue is bounded by images waiting or running; a full queue refuses at once (503).

A failed pass fails no bystander: when a batch of several scoring or encoding jobs raises (one
request's images break the model, or the batch runs out of device memory), each job runs again
alone, so only the culprit fails (500; out of memory: 503 "send fewer images"). A failed batched
generation fails every part: it has no input of its own to blame, and its streams have already
reported rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from models.base import DensityModel, SamplePart
from models.outliers import DOSE, Scorer, load_scorer
from models.vae import VAE
from service import scoring
from service.arrivals import Arrivals
from service.compute import ComputeThread
from service.errors import Unavailable
from service.metrics import Metrics

logger = logging.getLogger("genserve.worker")

T = TypeVar("T")

ARRIVAL_POLL_S = 0.0005  # while a batch waits, how often it checks that requests are still on their way


class State(StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    CLOSED = "closed"


@dataclass(eq=False)
class Job:
    """Work for one request: ``size`` images to score (``x``) or to draw (``n``)."""

    op: str  # "score", "encode" or "sample"
    key: tuple[Any, ...]  # jobs with equal keys may share a forward pass
    size: int
    payload: dict[str, Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: bool = False


@dataclass(frozen=True)
class BatchLimits:
    max_batch_size: int
    max_batch_wait_s: float
    max_queue: int
    max_concurrent_samples: int
    max_sample_batch: int = 64
    warmup: bool = True
    cuda_graphs: bool = False  # sampling steps as CUDA graphs on a CUDA worker (DensityModel.prepare_for_inference)
    torch_threads: int | None = None  # CPU threads of each thread that runs the model (None: torch's default)


@dataclass
class SampleResult:
    images: Tensor  # (n, C, H, W) integer levels, CPU
    log_prob: Tensor | None  # (n,) nats, CPU


class Worker:
    """Owns one copy of a model (and of its background model, if any) on one device: its thread
    forms the batches, and runs them itself (CUDA) or on the compute thread its CPU slot shares
    with the other models' workers (service/compute.py)."""

    def __init__(
        self,
        *,
        name: str,
        folder: Path,
        device: str,
        index: int,
        limits: BatchLimits,
        metrics: Metrics,
        arrivals: Arrivals | None = None,
        compute: ComputeThread | None = None,
    ) -> None:
        self.name = name
        self.compute = compute  # where its torch work runs (service/compute.py); None: its own thread
        self.arrivals = arrivals or Arrivals()  # requests on their way: whether a batch waits for more
        self.folder = folder
        self.device = device
        self.index = index
        self.limits = limits
        self.metrics = metrics
        self.model: DensityModel | None = None
        self.scorer: Scorer | None = None  # the model and its background companion, for /score
        self.state = State.LOADING
        self.error: str | None = None
        self.sample_slots = asyncio.Semaphore(limits.max_concurrent_samples)
        self.loaded = asyncio.Event()  # set once the thread has loaded (or failed to load) the model
        self._queue: deque[Job] = deque()
        self._pending = 0  # images queued or running
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name=f"genserve-{name}-{device}-{index}", daemon=True)
        self._labels = {"model": name, "device": device, "worker": str(index)}

    def __repr__(self) -> str:
        return f"Worker({self.name!r}, {self.device}, #{self.index}, {self.state.value})"

    # ---- event-loop side ----------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    @property
    def load(self) -> int:
        """Images queued or running: what least-loaded routing compares."""
        return self._pending

    async def run(self, op: str, key: tuple[Any, ...], size: int, payload: dict[str, Any]) -> Any:
        """Queue a job and wait for its result; cancelling the caller drops the job."""
        loop = asyncio.get_running_loop()
        job = Job(op=op, key=key, size=size, payload=payload, loop=loop, future=loop.create_future())
        try:
            self._submit(job)
        finally:
            self.arrivals.leave()  # queued (or refused): no longer on its way
        try:
            return await job.future
        except asyncio.CancelledError:
            self._cancel(job)
            raise

    def _submit(self, job: Job) -> None:
        with self._cond:
            if self.state is not State.READY:
                raise Unavailable(f"model '{self.name}' on {self.device} is {self.state.value}; retry later")
            # An idle worker takes any job, so one request larger than the queue limit still runs.
            if self._pending and self._pending + job.size > self.limits.max_queue:
                raise Unavailable(
                    f"model '{self.name}' is busy: {self._pending} images queued on {self.device} "
                    f"(limit {self.limits.max_queue}, GENSERVE_MAX_QUEUE); retry later"
                )
            self._queue.append(job)
            self._pending += job.size
            self._cond.notify()
        self._set_depth()

    def _cancel(self, job: Job) -> None:
        """Drop a job whose caller gave up; a job already in a batch finishes and is discarded."""
        with self._cond:
            job.cancelled = True
            if job in self._queue:
                self._queue.remove(job)
                self._pending -= job.size
        self._set_depth()

    def close(self) -> None:
        """Stop taking work; queued jobs fail with 503. The thread ends after its current batch."""
        with self._cond:
            self.state = State.CLOSED
            dropped = list(self._queue)
            self._queue.clear()
            self._pending -= sum(j.size for j in dropped)
            self._cond.notify_all()
        for job in dropped:
            _settle(job, error=Unavailable(f"model '{self.name}' is shutting down; retry on another instance"))

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- worker-thread side -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            scorer = self._on_device(self._load)
            model = scorer.model
        except Exception as e:
            logger.exception("model '%s' failed to load on %s", self.name, self.device)
            self.error = f"{type(e).__name__}: {e}"
            self.state = State.FAILED
            self._notify_loaded()
            return
        self.model, self.scorer = model, scorer
        with self._cond:
            if self.state is State.LOADING:
                self.state = State.READY
        logger.info("model '%s' ready on %s (worker %d)", self.name, self.device, self.index)
        self._notify_loaded()
        while (batch := self._next_batch()) is not None:
            self._execute(batch)

    def _on_device(self, fn: Callable[[], T]) -> T:
        """Run torch work where this worker's device runs it (see service/compute.py)."""
        return fn() if self.compute is None else self.compute.run(fn)

    def _load(self) -> Scorer:
        if self.limits.torch_threads:
            # Per thread: convolutions take their thread count from the calling thread's OpenMP
            # setting, which torch otherwise copies in only at the thread's first parallel op.
            torch.set_num_threads(self.limits.torch_threads)
        scorer, _ = load_scorer(self.folder, self.device)
        scorer.model.prepare_for_inference(cuda_graphs=self.limits.cuda_graphs)
        if self.limits.warmup:
            self._warmup(scorer)
        return scorer

    def _notify_loaded(self) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop has closed (shutdown during loading)
            self._loop.call_soon_threadsafe(self.loaded.set)

    def _warmup(self, scorer: Scorer) -> None:
        """One forward pass of every model (every score type), so the first request does not pay
        for lazy initialisation."""
        model = scorer.model
        c, h, w = model.shape
        x = torch.zeros(1, c, h, w, dtype=torch.uint8, device=self.device)
        y = torch.zeros(1, dtype=torch.long, device=self.device) if model.n_classes is not None else None
        labelled = [n for n in scorer.score_types if n != DOSE]  # dose judges p(x): no labels
        scorer.compute(x, y, labelled)
        if DOSE in scorer.score_types:
            scorer.compute(x, None, [DOSE])

    def _next_batch(self) -> list[Job] | None:
        """Block until work arrives; return the jobs for one pass, or None once closed."""
        limits = self.limits
        with self._cond:
            while not self._queue and self.state is State.READY:
                self._cond.wait()
            if self.state is not State.READY:
                return None
            first = self._queue.popleft()
            batch, size = [first], first.size
            cap = limits.max_sample_batch if first.op == "sample" else limits.max_batch_size
            deadline = first.enqueued + limits.max_batch_wait_s
            while size < cap:
                for job in list(self._queue):  # oldest first; other keys wait for a later pass
                    if job.key == first.key and size + job.size <= cap:
                        self._queue.remove(job)
                        batch.append(job)
                        size += job.size
                remaining = deadline - time.perf_counter()
                # Wait only for requests already inside the app (service/arrivals.py): a lone
                # request never waits for company that is not coming.
                if size >= cap or remaining <= 0 or not self.arrivals.expected(self.name):
                    break
                self._cond.wait(min(remaining, ARRIVAL_POLL_S))  # woken by a new job, or look again
                if self.state is not State.READY:
                    break
            return batch

    def _execute(self, batch: list[Job]) -> None:
        with self._cond:  # a caller may have gone while the batch was forming
            live = [j for j in batch if not j.cancelled]
        try:
            if live:
                self._on_device(lambda: self._answer(live))
        finally:
            with self._cond:
                self._pending -= sum(j.size for j in batch)
            self._set_depth()

    def _answer(self, live: list[Job]) -> None:
        """Run one batch and settle every job, on the device's compute thread."""
        start = time.perf_counter()  # the queue wait includes any wait for the compute thread
        for job in live:
            self.metrics.queue_wait.labels(**self._labels).observe(start - job.enqueued)
        try:
            results = self._run_pass(live)
        except Exception as e:
            self._recover(e)
            if len(live) == 1 or live[0].op == "sample":
                for job in live:  # a generation has no input of its own to blame: all parts fail
                    self._fail(job, e)
                return
            # One request's images (or the batch's size, for an out-of-memory error) must not
            # fail the requests batched with it: run each alone, so only a culprit fails.
            logger.warning(
                "model '%s' on %s: a batch of %d jobs failed (%s: %s); running them one at a time",
                self.name, self.device, len(live), type(e).__name__, e,
            )  # fmt: skip
            self._one_at_a_time(live)
            return
        for job, result in zip(live, results, strict=True):
            _settle(job, result=result)

    def _one_at_a_time(self, jobs: list[Job]) -> None:
        for job in jobs:
            with self._cond:
                if job.cancelled:
                    continue
            try:
                (result,) = self._run_pass([job])
            except Exception as e:
                self._recover(e)
                self._fail(job, e)
            else:
                _settle(job, result=result)

    def _run_pass(self, jobs: list[Job]) -> list[Any]:
        """One batched pass for jobs of one key: one result per job, in order; metrics observed."""
        start = time.perf_counter()
        op = jobs[0].op
        results: list[Any]
        if op == "score":
            results = self._score(jobs)
        elif op == "encode":
            results = self._encode(jobs)
        else:
            results = self._sample(jobs)
        assert len(results) == len(jobs), "one result per job"
        self.metrics.inference_seconds.labels(**self._labels, op=op).observe(time.perf_counter() - start)
        self.metrics.batch_images.labels(**self._labels, op=op).observe(sum(j.size for j in jobs))
        return results

    def _recover(self, error: Exception) -> None:
        """After a failed pass: give the memory of an out-of-memory pass back to the device."""
        if isinstance(error, torch.cuda.OutOfMemoryError) and self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def _fail(self, job: Job, error: Exception) -> None:
        """Answer one job with its error: out of memory is a 503 that says what to send instead;
        anything else is logged here and reaches the client as a generic 500 with its request id."""
        if isinstance(error, torch.cuda.OutOfMemoryError):
            logger.error("model '%s' on %s: out of memory on a job (%d images)", self.name, self.device, job.size)
            error = Unavailable(f"model '{self.name}' ran out of memory on {self.device}; send fewer images")
        else:
            logger.error("model '%s' on %s: a job failed (%d images)", self.name, self.device, job.size, exc_info=error)
        _settle(job, error=error)

    def _score(self, jobs: list[Job]) -> list[dict[str, Tensor]]:
        """One pass (in chunks of max_batch_size) over every job's images; each job gets its rows back."""
        assert self.scorer is not None
        _, score_type, heatmap, _unlabelled = jobs[0].key
        x = torch.cat([j.payload["x"] for j in jobs]).to(self.device)
        ys = [j.payload["y"] for j in jobs]
        y = None if ys[0] is None else torch.cat(ys).to(self.device)
        total, step = x.shape[0], self.limits.max_batch_size
        parts = []
        with torch.inference_mode():
            for s in range(0, total, step):
                yc = None if y is None else y[s : s + step]
                out = scoring.compute(self.scorer, x[s : s + step], yc, score_type=score_type, heatmap=heatmap)
                parts.append({k: v.cpu() for k, v in out.items()})
        merged = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        for k, v in merged.items():
            assert v.shape[0] == total, f"{k}: {v.shape[0]} outputs for {total} images"
        sizes = [j.size for j in jobs]
        return [
            dict(zip(merged, rows, strict=True))
            for rows in zip(*(v.split(sizes) for v in merged.values()), strict=True)
        ]

    def _encode(self, jobs: list[Job]) -> list[dict[str, Tensor]]:
        """q(z|x) of every job's images (a VAE's encoder), in chunks of max_batch_size."""
        model = self.model
        assert isinstance(model, VAE)
        x = torch.cat([j.payload["x"] for j in jobs]).to(self.device)
        means, stds = [], []
        with torch.inference_mode():
            for s in range(0, x.shape[0], self.limits.max_batch_size):
                m, sd = model.encode(x[s : s + self.limits.max_batch_size])
                means.append(m.float().cpu())
                stds.append(sd.float().cpu())
        mean, std = torch.cat(means), torch.cat(stds)
        assert mean.shape[0] == x.shape[0], f"{mean.shape[0]} codes for {x.shape[0]} images"
        sizes = [j.size for j in jobs]
        return [{"mean": m, "std": sd} for m, sd in zip(mean.split(sizes), std.split(sizes), strict=True)]

    def _sample(self, jobs: list[Job]) -> list[SampleResult | None]:
        """One batched generation for every job; a job cancelled on the way gets None (nobody waits)."""
        assert self.model is not None
        parts = []
        for job in jobs:
            p = job.payload
            label = p["label"]
            parts.append(
                SamplePart(
                    n=job.size,
                    generator=torch.Generator(device=self.device).manual_seed(p["seed"]),
                    temperature=p["temperature"],
                    labels=None
                    if label is None
                    else torch.full((job.size,), label, dtype=torch.long, device=self.device),
                    cancelled=lambda job=job: job.cancelled,  # type: ignore[misc]
                    on_row=p.get("on_row"),
                )
            )
        between_steps = None if self.compute is None else self._let_others_run
        with torch.inference_mode():
            outs = self.model.sample_parts(parts, between_steps=between_steps)
        results: list[SampleResult | None] = []
        for job, out in zip(jobs, outs, strict=True):
            if out is None:
                results.append(None)
                continue
            assert out.images.shape[0] == job.size, f"{out.images.shape[0]} samples for n={job.size}"
            log_prob = None if out.log_prob is None else out.log_prob.float().cpu()
            results.append(SampleResult(images=out.images.cpu(), log_prob=log_prob))
        return results

    def _let_others_run(self) -> None:
        """Between the pixels of a generation on a shared compute thread: give the slot's other
        waiting work its turn (service/compute.py), outside this generation's inference mode, as
        it would run on its own (a model loading then makes ordinary tensors)."""
        assert self.compute is not None
        if self.compute.waiting:
            with torch.inference_mode(False):
                self.compute.run_waiting()

    def _set_depth(self) -> None:
        self.metrics.queue_images.labels(**self._labels).set(self._pending)


def _settle(job: Job, *, result: Any = None, error: BaseException | None = None) -> None:
    """Resolve a job's future from any thread, unless its caller has already gone."""

    def apply() -> None:
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

    with contextlib.suppress(RuntimeError):  # the loop has closed
        job.loop.call_soon_threadsafe(apply)
