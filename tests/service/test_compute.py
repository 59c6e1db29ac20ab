"""Where the workers' torch work runs: one compute thread per CPU slot, shared by every model
(service/compute.py), or one per model with GENSERVE_CPU_COMPUTE=per_model."""

from __future__ import annotations

import asyncio
import ctypes
import os
import threading
import time

import anyio
import pytest
import torch

from models.base import SampleOutput
from service.batching import BatchLimits, Worker
from service.compute import ComputeThread
from service.jobs import ScoreTask
from service.metrics import Metrics
from tests.service.helpers import b64, gray_png, running, worker_of


def test_runs_functions_in_order_on_its_own_thread_and_returns_their_results():
    compute = ComputeThread("test-compute")
    assert "test-compute" not in {t.name for t in threading.enumerate()}  # starts on first use
    seen: list[tuple[int, str]] = []
    results = [compute.run(lambda i=i: seen.append((i, threading.current_thread().name)) or i * i) for i in range(5)]
    assert results == [0, 1, 4, 9, 16]
    assert seen == [(i, "test-compute") for i in range(5)]
    compute.close()


def test_hands_errors_to_the_caller_and_keeps_serving():
    compute = ComputeThread("test-compute")

    def broken() -> None:
        raise ValueError("bad batch")

    with pytest.raises(ValueError, match="bad batch"):
        compute.run(broken)
    assert compute.run(lambda: "still here") == "still here"
    compute.close()


def test_callers_on_several_threads_take_turns():
    compute = ComputeThread("test-compute")
    lock = threading.Lock()
    state = {"active": 0, "peak": 0, "calls": 0}

    def work() -> None:
        with lock:
            state["active"] += 1
            state["peak"] = max(state["peak"], state["active"])
            state["calls"] += 1
        time.sleep(0.0005)  # a window in which a second caller's work would overlap
        with lock:
            state["active"] -= 1

    callers = [threading.Thread(target=lambda: [compute.run(work) for _ in range(50)]) for _ in range(4)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(timeout=30)
    assert state["calls"] == 200 and state["peak"] == 1  # every call ran, never two at once
    compute.close()


def test_a_call_from_the_thread_itself_runs_at_once():
    compute = ComputeThread("test-compute")
    assert compute.run(lambda: compute.run(lambda: threading.current_thread().name)) == "test-compute"
    compute.close()


def test_after_close_what_was_submitted_runs_and_new_work_is_refused():
    compute = ComputeThread("test-compute")
    compute.run(lambda: None)
    compute.close()
    with pytest.raises(RuntimeError, match="compute thread test-compute is closed"):
        compute.run(lambda: None)


def record_threads(worker, method: str = "log_prob") -> list[str]:
    """Patch a loaded model so each call of ``method`` records the thread it runs on."""
    names: list[str] = []
    original = getattr(worker.model, method)

    def recorded(*args, **kwargs):
        names.append(threading.current_thread().name)
        return original(*args, **kwargs)

    setattr(worker.model, method, recorded)
    return names


@pytest.mark.anyio
async def test_cpu_workers_of_every_model_share_their_slots_compute_thread(make_settings):
    async with running(make_settings(models="pixelcnn,pixelcnn-cond", devices="cpu,cpu")) as (app, _):
        workers = {(m, i): worker_of(app, m, i) for m in ("pixelcnn", "pixelcnn-cond") for i in (0, 1)}
        assert workers["pixelcnn", 0].compute is workers["pixelcnn-cond", 0].compute
        assert workers["pixelcnn", 1].compute is workers["pixelcnn-cond", 1].compute
        assert workers["pixelcnn", 0].compute is not workers["pixelcnn", 1].compute
        names = {key: record_threads(w) for key, w in workers.items()}
        for (model, _), worker in workers.items():  # each worker directly: the pick keeps light load on one
            y = torch.tensor([1]) if model == "pixelcnn-cond" else None
            x = torch.zeros(1, *worker.model.shape, dtype=torch.uint8)
            await worker.run(ScoreTask(x=x, y=y, score_type="nll", heatmap=False))
    for (_, i), seen in names.items():
        assert seen and set(seen) == {f"genserve-compute-cpu-{i}"}


@pytest.mark.anyio
async def test_auto_shares_a_thread_between_several_models_and_not_for_one(make_settings):
    async with running(make_settings(models="pixelcnn,vae")) as (app, _):
        assert worker_of(app, "pixelcnn").compute is worker_of(app, "vae").compute is not None
    async with running(make_settings(models="pixelcnn")) as (app, client):
        worker = worker_of(app, "pixelcnn")
        assert worker.compute is None  # one model: its worker's own thread, no hand-over per batch
        names = record_threads(worker)
        assert (await client.post("/score", json={"model": "pixelcnn", "images": [b64(gray_png())]})).status_code == 200
    assert names == ["genserve-pixelcnn-cpu-0"]


@pytest.mark.anyio
async def test_per_model_cpu_compute_runs_each_model_on_its_own_thread(make_settings):
    async with running(make_settings(models="pixelcnn,vae", cpu_compute="per_model")) as (app, client):
        worker = worker_of(app, "pixelcnn")
        assert worker.compute is None and worker_of(app, "vae").compute is None
        names = record_threads(worker)
        r = await client.post("/score", json={"model": "pixelcnn", "images": [b64(gray_png())]})
        assert r.status_code == 200
    assert names == ["genserve-pixelcnn-cpu-0"]


def endless_generation(model, started: threading.Event, release: threading.Event) -> None:
    """Replace a loaded model's batched sampler by one that takes a step every few milliseconds
    until ``release`` is set (at most 10 s), then returns blank images."""

    def sample_parts(parts, *, between_steps=None):
        started.set()
        steps = 0
        while not release.is_set() and steps < 2000:
            steps += 1
            if between_steps is not None:
                between_steps()
            release.wait(0.005)
        return [SampleOutput(images=torch.zeros(p.n, *model.shape, dtype=torch.uint8), log_prob=None) for p in parts]

    model.sample_parts = sample_parts


@pytest.mark.anyio
async def test_a_generation_lets_other_models_batches_run_between_its_steps(make_settings):
    """On a shared compute thread a /score for another model waits for a step of a generation in
    progress, not for its end (here the generation ends only after the score is answered)."""
    async with running(make_settings(models="pixelcnn,vae")) as (app, client):
        started, release = threading.Event(), threading.Event()
        endless_generation(worker_of(app, "pixelcnn").model, started, release)
        names = record_threads(worker_of(app, "vae"), "iwae")  # what a VAE's /score runs
        sampling = asyncio.create_task(client.post("/sample", json={"model": "pixelcnn", "n": 2}))
        assert await anyio.to_thread.run_sync(started.wait, 10)
        r = await client.post("/score", json={"model": "vae", "images": [b64(gray_png())]})
        assert r.status_code == 200
        assert not sampling.done() and not release.is_set()  # answered while the generation runs
        release.set()
        assert (await sampling).status_code == 200
    assert names == ["genserve-compute-cpu-0"]


def wait_until(condition, timeout: float = 10.0) -> None:
    """Poll another thread's progress (a task being queued has no event of its own)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        threading.Event().wait(0.001)


def test_run_waiting_runs_the_tasks_already_waiting_and_not_later_ones():
    compute = ComputeThread("test-compute", min_slice_s=0.0)
    order: list[str] = []

    def submit(name: str, then=None) -> None:
        """Submit a task from another thread, as a worker does; return once it is queued."""

        def task() -> None:
            order.append(name)
            if then is not None:
                then()

        before = compute.waiting
        threading.Thread(target=compute.run, args=(task,), daemon=True).start()
        wait_until(lambda: compute.waiting > before)

    def long_task() -> None:
        submit("a", then=lambda: submit("c"))  # "c" is queued while run_waiting runs "a"
        submit("b")
        compute.run_waiting()
        order.append("long task ends")

    compute.run(long_task)
    compute.run(lambda: None)  # queued after "c"
    assert order == ["a", "b", "long task ends", "c"]
    compute.close()


def test_waiting_tasks_get_their_turn_only_after_the_long_task_had_as_long():
    """Time sharing: the long task runs min_slice_s before the first turn of the waiting tasks,
    and after a turn that took T, at least T before the next."""
    compute = ComputeThread("test-compute", min_slice_s=0.02)
    turns: list[tuple[float, float]] = []  # (start, end) of each short task

    def short(seconds: float) -> None:
        start = time.perf_counter()
        time.sleep(seconds)  # the short task's work
        turns.append((start, time.perf_counter()))

    def submit(seconds: float) -> None:
        before = compute.waiting
        threading.Thread(target=compute.run, args=(lambda: short(seconds),), daemon=True).start()
        wait_until(lambda: compute.waiting > before)

    def long_task() -> float:
        started = time.perf_counter()
        submit(0.06)
        while not turns:
            compute.run_waiting()
        submit(0.0)
        while len(turns) < 2:
            compute.run_waiting()
        return started

    started = compute.run(long_task)
    (first_start, first_end), (second_start, _) = turns
    assert first_start - started >= 0.02  # min_slice_s
    assert second_start - first_end >= 0.06  # as long as the last turn took
    compute.close()


def test_work_run_between_steps_leaves_the_generations_inference_mode(tmp_path):
    """A batch (or a model loading) that gets its turn inside a generation runs as it would on its
    own, not in the generation's inference mode (a model loaded there would get inference tensors)."""
    compute = ComputeThread("test-compute", min_slice_s=0.0)
    limits = BatchLimits(max_batch_size=1, max_batch_wait_s=0.0, max_queue=1, max_concurrent_samples=1)
    worker = Worker(name="m", folder=tmp_path, device="cpu", index=0, limits=limits, metrics=Metrics(), compute=compute)
    seen: list[bool] = []

    def generation() -> None:
        with torch.inference_mode():
            before = compute.waiting
            threading.Thread(
                target=compute.run, args=(lambda: seen.append(torch.is_inference_mode_enabled()),), daemon=True
            ).start()
            wait_until(lambda: compute.waiting > before)
            worker._let_others_run()
            seen.append(torch.is_inference_mode_enabled())

    compute.run(generation)
    assert seen == [False, True]  # the other work ran outside it; the generation's mode is back
    compute.close()


@pytest.fixture
def restore_threads():
    """The app sets torch's thread count process-wide: give the rest of the suite its own back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def openmp_threads() -> int:
    """The OpenMP thread count of the calling thread (what torch's convolutions use)."""
    try:
        return int(ctypes.CDLL(None).omp_get_max_threads())
    except AttributeError:
        pytest.skip("torch is not built with OpenMP here")


@pytest.mark.anyio
@pytest.mark.parametrize("cpu_compute", ["shared", "per_model"])
async def test_torch_threads_apply_on_the_thread_that_runs_the_model(make_settings, cpu_compute, restore_threads):
    async with running(make_settings(models="pixelcnn", torch_threads=1, cpu_compute=cpu_compute)) as (app, client):
        seen: list[int] = []
        model = worker_of(app, "pixelcnn").model
        original = model.log_prob

        def log_prob(x, y=None):
            seen.append(openmp_threads())
            return original(x, y)

        model.log_prob = log_prob
        r = await client.post("/score", json={"model": "pixelcnn", "images": [b64(gray_png())]})
        assert r.status_code == 200
    assert seen == [1]


def native_threads() -> int:
    """Threads of this process that Python did not start: OpenMP's helpers among them."""
    python = {t.native_id for t in threading.enumerate()}
    return sum(1 for tid in os.listdir("/proc/self/task") if int(tid) not in python)


@pytest.mark.anyio
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through Linux's /proc")
async def test_serving_every_route_starts_no_more_openmp_pools(make_settings):
    """Only the compute thread runs torch ops large enough to start a pool of helper threads: the
    event loop and the threads that decode uploads and encode PNGs start none, which would make
    every op of the compute thread pay to wake its helpers again (service/compute.py)."""
    one, grid = [b64(gray_png(i)) for i in range(2)], {"Accept": "image/png"}
    async with running(make_settings(models="pixelcnn,vae")) as (_, client):
        before = native_threads()
        for r in [
            await client.post("/score", json={"model": "pixelcnn", "images": one * 32, "heatmap": True}),
            await client.post("/score", json={"model": "vae", "images": one * 32}),
            await client.post("/encode", json={"model": "vae", "images": one * 32}),
            await client.post("/sample", json={"model": "pixelcnn", "n": 64}),
            await client.post("/sample", json={"model": "pixelcnn", "n": 64}, headers=grid),
            await client.post("/sample", json={"model": "vae", "n": 64}),
            await client.post("/sample/stream", json={"model": "pixelcnn", "n": 16}),
        ]:
            assert r.status_code == 200, r.text
        assert native_threads() == before
