"""One worker per (model, device): a thread that owns the model and a dynamic batcher in front of it.

Requests wait here. The event loop submits a :class:`Job` and awaits its future; the worker thread
takes the oldest job, gathers queued jobs whose tasks (service/jobs.py) share its batch key up to
the task's cap of images, waiting up to ``max_batch_wait_ms`` after the first one arrived for more
but only while other requests are on their way to this model (service/arrivals.py), runs one
forward pass for all of them (a CPU worker on the compute thread its slot shares with the other
models' workers, service/compute.py; a worker whose model has a process of its own, in that process,
service/model_process.py), splits the outputs back, and resolves each future on the loop.

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
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import torch

from models.base import DensityModel
from models.scoring.scorer import Scorer
from models.threads import torch_threads
from service.arrivals import Arrivals
from service.compute import ComputeThread
from service.cores import CoreShare
from service.errors import Unavailable
from service.gather import regather, take
from service.jobs import PassLimits, Runtime, Task
from service.loading import BatchLimits, load_for_serving
from service.metrics import Metrics
from service.model_process import Target
from service.model_server import ServerAddress
from service.queued import Job, settle
from service.shared_model import model_process_for

logger = logging.getLogger("genserve.worker")

T = TypeVar("T")

ARRIVAL_POLL_S = 0.0005  # while a batch waits, how often it checks that requests are still on their way


class State(StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    CLOSED = "closed"


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
        process_target: Target | None = None,
        server: ServerAddress | None = None,
        cores: CoreShare | None = None,
    ) -> None:
        self.name = name
        self.compute = compute  # where its torch work runs (service/compute.py); None: its own thread
        self.cores = cores  # a CPU worker's: the cores its passes share with other workers' (service/cores.py)
        self.arrivals = arrivals or Arrivals()  # requests on their way: whether a batch waits for more
        self.folder, self.device, self.index = folder, device, index
        self.limits, self.metrics = limits, metrics
        self.model: DensityModel | None = None
        self.scorer: Scorer | None = None  # the model and its background companion, for /score
        self.runtime: Runtime | None = None  # what the tasks run on, once loaded (a thread worker)
        self.process = model_process_for(  # where they run instead (GENSERVE_MODEL_PROCESS, or a shared server)
            name=name, folder=folder, device=device, limits=limits, target=process_target, server=server
        )
        self.weights_sha256 = ""  # of the weights loaded, once loaded
        self.pass_limits = PassLimits(max_batch_size=limits.max_batch_size, max_sample_batch=limits.max_sample_batch)
        self.state = State.LOADING
        self.error: str | None = None
        self.sample_slots = asyncio.Semaphore(limits.max_concurrent_samples)
        self._threads = torch.get_num_threads()  # the compute thread's own count, read again at load
        self.pass_size = limits.max_batch_size  # images per score pass: the warm-up sweep's choice
        self.loaded = asyncio.Event()  # set once the thread has loaded (or failed to load) the model
        self._queue: deque[Job] = deque()
        self._pending = 0  # images queued or running
        self._last_pass = (0, 0.0)  # images and seconds of the last score pass, for the regather wait
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

    async def run(self, task: Task[T]) -> T:
        """Queue a task and wait for its result; cancelling the caller drops the job."""
        loop = asyncio.get_running_loop()
        job = Job(task=task, loop=loop, future=loop.create_future())
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
            settle(job, error=Unavailable(f"model '{self.name}' is shutting down; retry on another instance"))

    def _give_up(self, why: str) -> None:
        """The model cannot run any more: FAILED (as /readyz and /models say), queued jobs get 503."""
        logger.error("model '%s' on %s failed: %s", self.name, self.device, why)
        with self._cond:
            self.error, self.state = why, State.FAILED
            dropped = list(self._queue)
            self._queue.clear()
            self._pending -= sum(j.size for j in dropped)
        for job in dropped:
            settle(job, error=Unavailable(f"model '{self.name}' failed on {self.device}: {why}"))

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- worker-thread side -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._start_model()
        except Exception as e:
            logger.exception("model '%s' failed to load on %s", self.name, self.device)
            self.error = f"{type(e).__name__}: {e}"
            self.state = State.FAILED
            self._notify_loaded()
            return
        self.pass_limits = PassLimits(max_batch_size=self.pass_size, max_sample_batch=self.limits.max_sample_batch)
        with self._cond:
            if self.state is State.LOADING:
                self.state = State.READY
        logger.info("model '%s' ready on %s (worker %d%s)", self.name, self.device, self.index,
                    "" if self.process is None else f", model process {self.process.pid}")  # fmt: skip
        self._notify_loaded()
        try:
            while (batch := self._next_batch()) is not None:
                self._execute(batch)
                if self.process is not None and self.process.broken:
                    self._give_up(f"its model process could not be started again: {self.process.broken}")
        finally:
            if self.process is not None:
                self.process.stop()

    def _start_model(self) -> None:
        """Load the model where its passes will run: its model process, or this worker's thread."""
        if self.process is not None:
            self.process.start()
            self.weights_sha256, self.pass_size = self.process.weights_sha256, self.process.pass_size
            return
        loaded = self._on_device(lambda: load_for_serving(self.folder, self.device, self.limits, name=self.name))
        self.model, self.scorer, self._threads = loaded.scorer.model, loaded.scorer, loaded.threads
        self.weights_sha256, self.pass_size = loaded.scorer.weights_sha256, loaded.pass_size
        self.runtime = Runtime(
            scorer=loaded.scorer,
            device=self.device,
            max_batch_size=self.pass_size,
            max_sample_batch=self.limits.max_sample_batch,
            between_steps=None if self.compute is None else self._let_others_run,
        )

    def _on_device(self, fn: Callable[[], T]) -> T:
        """Run torch work where this worker's device runs it (see service/compute.py)."""
        return fn() if self.compute is None else self.compute.run(fn)

    def _notify_loaded(self) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop has closed (shutdown during loading)
            self._loop.call_soon_threadsafe(self.loaded.set)

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
            key, cap = first.task.batch_key(), first.task.batch_cap(self.pass_limits)
            deadline = first.enqueued + limits.max_batch_wait_s
            while size < cap:
                size = take(self._queue, batch, size, key, cap)
                remaining = deadline - time.perf_counter()
                # Wait only for requests already inside the app (service/arrivals.py): a lone
                # request never waits for company that is not coming.
                if size >= cap or remaining <= 0 or not self.arrivals.expected(self.name):
                    break
                self._cond.wait(min(remaining, ARRIVAL_POLL_S))  # woken by a new job, or look again
                if self.state is not State.READY:
                    break
            if first.task.isolate_failures and self.limits.regather:  # score-like jobs only
                ready = lambda: self.state is State.READY  # noqa: E731
                regather(self._cond, self._queue, batch, size, key, cap, last=self._last_pass,
                         fraction=self.limits.regather, ready=ready)  # fmt: skip
            return batch

    def _execute(self, batch: list[Job]) -> None:
        with self._cond:  # a caller may have gone while the batch was forming
            live = [j for j in batch if not j.cancelled]
        done = [False]

        def release() -> None:  # once: the batch's images no longer count as this worker's load
            if not done[0]:
                done[0] = True
                with self._cond:
                    self._pending -= sum(j.size for j in batch)
                self._set_depth()

        try:
            if live:
                self._on_device(lambda: self._answer(live, release))
        finally:
            release()

    def _answer(self, live: list[Job], release: Callable[[], None]) -> None:
        """Run one batch and settle every job, on the device's compute thread; ``release`` the
        batch's load before its callers hear back (the next request of one may come at once)."""
        start = time.perf_counter()  # the queue wait includes any wait for the compute thread
        for job in live:
            self.metrics.queue_wait.labels(**self._labels).observe(start - job.enqueued)
        try:
            results = self._run_pass(live)
            if live[0].task.isolate_failures:  # score-like passes: what service.gather.regather compares with
                with self._cond:
                    self._last_pass = (sum(j.size for j in live), time.perf_counter() - start)
        except Exception as e:
            self._recover(e)
            if len(live) == 1 or not live[0].task.isolate_failures:
                for job in live:  # e.g. a generation, which has no input of its own to blame: all parts fail
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
        release()
        for job, result in zip(live, results, strict=True):
            settle(job, result=result)

    def _one_at_a_time(self, jobs: list[Job]) -> None:
        for job in jobs:
            with self._cond:
                if job.cancelled:
                    continue
            try:
                (result,) = self._run_pass([job], alone=True)
            except Exception as e:
                self._recover(e)
                self._fail(job, e)
            else:
                settle(job, result=result)

    def _run_pass(self, jobs: list[Job], *, alone: bool = False) -> list[Any]:
        """One batched pass for jobs of one key (``alone``: a retry, never merged): one result per job; metrics."""
        start = time.perf_counter()
        task_type = type(jobs[0].task)
        op = task_type.op
        tasks, cancelled = [j.task for j in jobs], [j.is_cancelled for j in jobs]
        with self.cores.claim() if self.cores is not None else contextlib.nullcontext(None) as threads:
            if self.process is not None:
                backlog = self._pending - sum(j.size for j in jobs)  # queued behind it: a shared server waits for them
                results = self.process.run(task_type, tasks, cancelled, alone=alone, backlog=backlog, threads=threads)
            else:
                assert self.runtime is not None
                with torch_threads(threads):
                    results = task_type.run(self.runtime, tasks, cancelled)
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
        settle(job, error=error)

    def _let_others_run(self) -> None:
        """Between the pixels of a generation on a shared compute thread: give the slot's other
        waiting work its turn (service/compute.py), outside this generation's inference mode, as
        it would run on its own (a model loading then makes ordinary tensors)."""
        assert self.compute is not None
        if self.compute.waiting:
            with torch.inference_mode(False), torch_threads(self._threads):
                self.compute.run_waiting()

    def _set_depth(self) -> None:
        self.metrics.queue_images.labels(**self._labels).set(self._pending)
