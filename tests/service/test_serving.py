"""The serving core: readiness, dynamic batching, routing, backpressure, timeouts, cancellation, auth.

Synchronisation waits on events (a gated model's ``entered``, a worker's submissions), never on sleeps.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import torch

import service.batching
import service.loading
import service.uploads
from models.scoring.scorer import load_scorer
from tests.service.helpers import Gate, b64, gray_png, json_post_scope, png_bytes, post_json, running, worker_of

pytestmark = pytest.mark.anyio

ONE = {"model": "pixelcnn", "images": [b64(gray_png())]}


async def wait_thread_event(event: threading.Event) -> None:
    assert await anyio.to_thread.run_sync(event.wait, 10), "event not set within 10 s"


def count_submissions(worker) -> asyncio.Event:
    """Patch a worker so the test can wait until a given number of jobs have been queued."""
    state = {"n": 0, "want": 0}
    ready = asyncio.Event()
    original = worker._submit

    def submit(job):
        original(job)
        state["n"] += 1
        if state["n"] >= state["want"]:
            ready.set()

    worker._submit = submit

    async def wait_for(n: int) -> None:
        state["want"] = n
        if state["n"] >= n:
            return
        ready.clear()
        await ready.wait()

    ready.wait_for = wait_for  # type: ignore[attr-defined]
    return ready


# ---- readiness ------------------------------------------------------------------------------------


async def test_readyz_503_until_models_loaded_then_200(make_settings, monkeypatch):
    release = threading.Event()

    def slow_load(folder, device):
        assert release.wait(10)
        return load_scorer(folder, device)

    monkeypatch.setattr(service.loading, "load_scorer", slow_load)
    async with running(make_settings(models="pixelcnn,vae"), wait=False) as (app, client):
        r = await client.get("/readyz")
        assert r.status_code == 503 and r.headers["retry-after"] == "2"
        assert r.json()["detail"] == "loading models ['pixelcnn', 'vae'] (0 of 2 workers ready)"
        assert (await client.get("/healthz")).status_code == 200
        r = await client.post("/score", json=ONE)
        assert r.status_code == 503 and r.json()["detail"].startswith("model 'pixelcnn' is not ready: loading")
        release.set()
        await app.state.registry.wait_loaded()
        r = await client.get("/readyz")
        assert r.status_code == 200 and r.json() == {"status": "ready", "models": ["pixelcnn", "vae"]}


async def test_readyz_before_startup_is_503(make_settings):
    import httpx

    from service.app import create_app

    app = create_app(make_settings())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        r = await client.get("/readyz")
        assert r.status_code == 503
        assert r.json()["detail"] == "models are not loaded yet (the service is starting)"


async def test_readyz_reports_a_model_that_failed_to_load(make_settings, model_dir: Path, tmp_path: Path):
    shutil.copytree(model_dir / "pixelcnn", tmp_path / "broken")
    weights = tmp_path / "broken" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"tampered")
    async with running(make_settings(model_dir=tmp_path)) as (_, client):
        r = await client.get("/readyz")
        assert r.status_code == 503
        assert r.json()["detail"].startswith("model 'broken' failed to load on cpu: CheckpointError:")
        assert "does not match" in r.json()["detail"]


# ---- batching and routing ---------------------------------------------------------------------------


async def test_concurrent_requests_share_one_forward_pass(make_settings):
    async with running(make_settings(models="pixelcnn")) as (app, client):
        worker = worker_of(app, "pixelcnn")
        gate = Gate(worker.model, block=True)
        submitted = count_submissions(worker)
        async with anyio.create_task_group() as tg:
            results = {}

            async def post(i: int, n: int) -> None:
                results[i] = await client.post("/score", json={"model": "pixelcnn", "images": [b64(gray_png(i))] * n})

            tg.start_soon(post, 0, 1)  # occupies the worker
            await wait_thread_event(gate.entered)
            for i in range(1, 4):  # three requests, 1 + 2 + 3 images, queue behind it
                tg.start_soon(post, i, i)
            await submitted.wait_for(4)
            gate.release.set()
        assert [r.status_code for r in results.values()] == [200] * 4
        assert gate.calls == [1, 6]
        assert [len(results[i].json()["results"]) for i in range(4)] == [1, 1, 2, 3]
        labels = {"model": "pixelcnn", "device": "cpu", "worker": "0", "op": "score"}
        assert app.state.metrics.sample_value("genserve_batch_images_count", labels) == 2
        assert app.state.metrics.sample_value("genserve_batch_images_sum", labels) == 7


def fail_when(model, check) -> None:
    """Make a loaded model's log_prob raise ``check(x)`` when that returns an exception."""
    original = model.log_prob

    def log_prob(x, y=None):
        error = check(x)
        if error is not None:
            raise error
        return original(x, y)

    model.log_prob = log_prob


async def batch_behind_a_busy_worker(client, worker, gate: Gate, bodies: list[dict]) -> list:
    """Hold the worker on one request, queue ``bodies`` behind it (one batch), release; the
    responses to ``bodies`` in order."""
    submitted = count_submissions(worker)
    results: dict[int, object] = {}
    async with anyio.create_task_group() as tg:

        async def post(i: int, body: dict) -> None:
            results[i] = await client.post("/score", json=body)

        tg.start_soon(post, -1, ONE)
        await wait_thread_event(gate.entered)
        for i, body in enumerate(bodies):
            tg.start_soon(post, i, body)
        await submitted.wait_for(len(bodies) + 1)
        gate.release.set()
    assert results[-1].status_code == 200
    return [results[i] for i in range(len(bodies))]


async def test_a_failing_request_does_not_fail_the_requests_batched_with_it(make_settings, caplog):
    poison = b64(png_bytes(np.full((8, 8), 255, dtype=np.uint8)))
    async with running(make_settings(models="pixelcnn")) as (app, client):
        worker = worker_of(app, "pixelcnn")
        fail_when(worker.model, lambda x: RuntimeError("poisoned") if (x == 255).all(dim=(1, 2, 3)).any() else None)
        good = [[b64(gray_png(i))] * i for i in (2, 3)]
        alone = [(await client.post("/score", json={"model": "pixelcnn", "images": g})).json() for g in good]
        gate = Gate(worker.model, block=True)
        bodies = [{"model": "pixelcnn", "images": [poison]}] + [{"model": "pixelcnn", "images": g} for g in good]
        responses = await batch_behind_a_busy_worker(client, worker, gate, bodies)
    assert gate.calls[:2] == [1, 6] and sorted(gate.calls[2:]) == [1, 2, 3]  # the batch failed; each then ran alone
    assert [r.status_code for r in responses] == [500, 200, 200]
    assert responses[0].json()["detail"] == "internal error"
    assert [r.json() for r in responses[1:]] == alone  # the same answers as when sent alone
    assert "a batch of 3 jobs failed (RuntimeError: poisoned); running them one at a time" in caplog.text


async def test_out_of_memory_on_a_batch_retries_its_requests_alone(make_settings):
    def oom(x):  # a device that holds 3 images at most
        return torch.cuda.OutOfMemoryError("CUDA out of memory") if x.shape[0] > 3 else None

    async with running(make_settings(models="pixelcnn")) as (app, client):
        worker = worker_of(app, "pixelcnn")
        fail_when(worker.model, oom)
        gate = Gate(worker.model, block=True)
        bodies = [{"model": "pixelcnn", "images": [b64(gray_png(i))] * i} for i in (1, 2, 3)]
        responses = await batch_behind_a_busy_worker(client, worker, gate, bodies)
        assert gate.calls[:2] == [1, 6] and sorted(gate.calls[2:]) == [1, 2, 3]
        assert [r.status_code for r in responses] == [200, 200, 200]
        assert [len(r.json()["results"]) for r in responses] == [1, 2, 3]
        r = await client.post("/score", json={"model": "pixelcnn", "images": [b64(gray_png())] * 4})
        assert r.status_code == 503
        assert r.json()["detail"] == "model 'pixelcnn' ran out of memory on cpu; send fewer images"


async def test_batches_are_split_by_max_batch_size_and_score_options(make_settings):
    async with running(make_settings(models="pixelcnn", max_batch_size=4)) as (app, client):
        worker = worker_of(app, "pixelcnn")
        gate = Gate(worker.model, block=True)
        submitted = count_submissions(worker)
        async with anyio.create_task_group() as tg:
            tg.start_soon(post_json, client, "/score", ONE)
            await wait_thread_event(gate.entered)
            for _ in range(3):  # 3 x 2 images: two fit one pass of 4
                tg.start_soon(post_json, client, "/score", {"model": "pixelcnn", "images": [b64(gray_png())] * 2})
            tg.start_soon(post_json, client, "/score", {**ONE, "heatmap": True})  # another key: its own pass
            await submitted.wait_for(5)
            gate.release.set()
        assert gate.calls[:3] == [1, 4, 2]  # the heatmap pass uses pixel_log_prob, not log_prob
        ops = app.state.metrics.sample_value(
            "genserve_batch_images_count", {"model": "pixelcnn", "device": "cpu", "worker": "0", "op": "score"}
        )
        assert ops == 4


async def test_large_request_runs_in_chunks(make_settings):
    async with running(make_settings(models="pixelcnn", max_batch_size=4)) as (app, client):
        gate = Gate(worker_of(app, "pixelcnn").model)
        r = await client.post("/score", json={"model": "pixelcnn", "images": [b64(gray_png(i)) for i in range(10)]})
        assert r.status_code == 200 and len(r.json()["results"]) == 10
        assert gate.calls == [4, 4, 2]


async def test_two_cpu_workers_share_the_load_and_the_cores(make_settings):
    async with running(make_settings(models="pixelcnn", devices="cpu,cpu", torch_threads=2)) as (app, client):
        info = (await client.get("/models/pixelcnn")).json()
        assert info["devices"] == ["cpu", "cpu"]
        any_entered = threading.Event()
        workers = app.state.registry.get("pixelcnn").workers
        gates = [Gate(w.model, block=True, any_entered=any_entered) for w in workers]
        async with anyio.create_task_group() as tg:
            tg.start_soon(post_json, client, "/score", ONE)
            await wait_thread_event(any_entered)
            busy = 0 if gates[0].entered.is_set() else 1
            tg.start_soon(post_json, client, "/score", ONE)  # least loaded: the idle worker
            await wait_thread_event(gates[1 - busy].entered)
            for g in gates:
                g.release.set()
        assert gates[0].calls == [1] and gates[1].calls == [1]
        # the first pass ran alone on both cores; the second, beside it, on what was left (service/cores.py)
        assert gates[busy].threads == [2] and gates[1 - busy].threads == [1]
        assert (await client.post("/score", json=ONE)).status_code == 200  # alone again: every core
        assert gates[0].threads[-1] == 2


async def test_light_load_keeps_to_the_first_worker(make_settings):
    async with running(make_settings(models="pixelcnn", devices="cpu,cpu")) as (app, client):
        for _ in range(4):
            assert (await client.post("/score", json=ONE)).status_code == 200
        counts = [
            app.state.metrics.sample_value(
                "genserve_batch_images_count", {"model": "pixelcnn", "device": "cpu", "worker": i, "op": "score"}
            )
            for i in ("0", "1")
        ]
        assert counts[0] == 4 and not counts[1]  # of equally loaded workers, the first: the other sleeps


# ---- backpressure, timeouts, cancellation ----------------------------------------------------------------


async def test_full_queue_is_503_with_retry_after(make_settings):
    async with running(make_settings(models="pixelcnn", max_queue=2)) as (app, client):
        gate = Gate(worker_of(app, "pixelcnn").model, block=True)
        async with anyio.create_task_group() as tg:
            first = {}

            async def post_first() -> None:
                first["r"] = await client.post("/score", json={"model": "pixelcnn", "images": [b64(gray_png())] * 2})

            tg.start_soon(post_first)
            await wait_thread_event(gate.entered)
            r = await client.post("/score", json=ONE)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["detail"] == (
                "model 'pixelcnn' is busy: 2 images queued on cpu (limit 2, GENSERVE_MAX_QUEUE); retry later"
            )
            gate.release.set()
        assert first["r"].status_code == 200


async def test_request_past_timeout_is_504_and_its_job_is_dropped(make_settings):
    async with running(make_settings(models="pixelcnn", request_timeout_s=0.2)) as (app, client):
        worker = worker_of(app, "pixelcnn")
        gate = Gate(worker.model, block=True)
        submitted = count_submissions(worker)
        async with anyio.create_task_group() as tg:
            tg.start_soon(post_json, client, "/score", ONE)  # runs, blocked, and times out itself
            await wait_thread_event(gate.entered)
            r = await client.post("/score", json={"model": "pixelcnn", "images": [b64(gray_png())] * 3})
            assert r.status_code == 504
            assert r.json()["detail"] == (
                "model 'pixelcnn' did not answer within 0.2 s (GENSERVE_REQUEST_TIMEOUT_S); "
                "the service is busy: retry later or send fewer images"
            )
            await submitted.wait_for(2)
            assert worker.load == 1  # only the running job: the timed-out one left the queue
            gate.release.set()
        app.state.settings.request_timeout_s = 30.0  # the rest must not depend on this machine's speed
        r = await client.post("/score", json={"model": "pixelcnn", "images": [b64(gray_png())] * 2})
        assert r.status_code == 200
        assert gate.calls == [1, 2]  # the timed-out 3-image job never ran


async def test_cancelled_request_is_not_computed(make_settings):
    async with running(make_settings(models="pixelcnn")) as (app, client):
        worker = worker_of(app, "pixelcnn")
        gate = Gate(worker.model, block=True)
        submitted = count_submissions(worker)
        first = asyncio.create_task(client.post("/score", json=ONE))
        await wait_thread_event(gate.entered)
        doomed = asyncio.create_task(client.post("/score", json={"model": "pixelcnn", "images": [b64(gray_png())] * 5}))
        await submitted.wait_for(2)
        assert worker.load == 6
        doomed.cancel()  # what a client disconnect does to the awaiting coroutine
        with pytest.raises(asyncio.CancelledError):
            await doomed
        assert worker.load == 1
        gate.release.set()
        assert (await first).status_code == 200
        assert (await client.post("/score", json=ONE)).status_code == 200
        assert gate.calls == [1, 1]


async def test_client_disconnect_drops_its_queued_job(make_settings):
    async with running(make_settings(models="pixelcnn")) as (app, client):
        worker = worker_of(app, "pixelcnn")
        gate = Gate(worker.model, block=True)
        submitted = count_submissions(worker)
        first = asyncio.create_task(client.post("/score", json=ONE))
        await wait_thread_event(gate.entered)

        # A raw ASGI call whose client hangs up after sending its body, as uvicorn reports it.
        body = json.dumps({"model": "pixelcnn", "images": [b64(gray_png())] * 5}).encode()
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        hang_up = asyncio.Event()
        sent: list[dict] = []

        async def receive() -> dict:
            if messages:
                return messages.pop(0)
            await hang_up.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = json_post_scope("/score", body)
        call = asyncio.create_task(app(scope, receive, send))
        await submitted.wait_for(2)
        assert worker.load == 6
        hang_up.set()
        await call
        assert sent[0]["status"] == 499 and worker.load == 1
        gate.release.set()
        assert (await first).status_code == 200
        assert (await client.post("/score", json=ONE)).status_code == 200
        assert gate.calls == [1, 1]
        assert (
            app.state.metrics.sample_value(
                "genserve_requests_total", {"route": "/score", "model": "pixelcnn", "status": "499"}
            )
            == 1
        )


async def test_sample_concurrency_is_capped_per_worker(make_settings):
    async with running(make_settings(models="pixelcnn", max_concurrent_samples=1, request_timeout_s=0.2)) as (
        app,
        client,
    ):
        worker = worker_of(app, "pixelcnn")
        async with worker.sample_slots:  # the one slot is taken
            r = await client.post("/sample", json={"model": "pixelcnn", "seed": 1})
        assert r.status_code == 504
        app.state.settings.request_timeout_s = 30.0
        assert (await client.post("/sample", json={"model": "pixelcnn", "seed": 1})).status_code == 200


# ---- auth -------------------------------------------------------------------------------------------


async def test_api_keys(make_settings):
    async with running(make_settings(models="pixelcnn", api_keys="key-one, key-two")) as (_, client):
        r = await client.get("/models")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["detail"] == "missing or invalid API key; send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"
        assert (await client.get("/models", headers={"Authorization": "Bearer wrong"})).status_code == 401
        assert (await client.get("/models", headers={"X-API-Key": "key-"})).status_code == 401
        assert (await client.get("/models", headers={"Authorization": "Bearer key-two"})).status_code == 200
        assert (await client.get("/models", headers={"X-API-Key": "key-one"})).status_code == 200
        assert (await client.post("/score", json=ONE)).status_code == 401
        assert (await client.post("/sample", json={"model": "pixelcnn"})).status_code == 401
        r = await client.post("/score", json=ONE, headers={"X-API-Key": "key-one"})
        assert r.status_code == 200
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/metrics", headers={"X-API-Key": "key-two"})).status_code == 200


async def test_public_metrics(make_settings):
    async with running(make_settings(models="pixelcnn", api_keys="k", metrics_public=True)) as (_, client):
        assert (await client.get("/metrics")).status_code == 200
        assert (await client.get("/models")).status_code == 401


# ---- the batcher's wait: only for requests on their way ------------------------------------------


def raw_post(app, path: str, body: bytes, *, body_sent: asyncio.Event):
    """A raw ASGI POST whose body reaches the app only once ``body_sent`` is set: a client that is
    still uploading (so it holds no arrival ticket yet). Returns (task, sent messages)."""
    sent: list[dict] = []
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        await body_sent.wait()
        if delivered:  # the client stays connected: the app's disconnect watch waits on
            await asyncio.Event().wait()
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = json_post_scope(path, body)
    return asyncio.create_task(app(scope, receive, send)), sent


def no_arrivals_left(app) -> bool:
    arrivals = app.state.registry.arrivals
    return arrivals.unassigned == 0 and not arrivals.by_model


async def test_a_lone_request_does_not_wait_for_company(make_settings):
    # A 30 s wait would be paid in full by a fixed-delay batcher; nothing else is on its way here.
    async with running(make_settings(models="pixelcnn", max_batch_wait_ms=30_000)) as (app, client):
        with anyio.fail_after(10):
            for _ in range(3):
                assert (await client.post("/score", json=ONE)).status_code == 200
                r = await client.post("/sample", json={"model": "pixelcnn", "n": 1, "seed": 1})
                assert r.status_code == 200
        assert no_arrivals_left(app)


async def test_a_batch_waits_for_a_request_still_on_its_way(make_settings, monkeypatch):
    decoding, release = threading.Event(), threading.Event()
    decode_all = service.uploads.decode_all

    def held_decode(data, *args, **kwargs):  # holds the 2-image request in its image decoding
        if len(data) == 2:
            decoding.set()
            release.wait(10)
        return decode_all(data, *args, **kwargs)

    monkeypatch.setattr(service.uploads, "decode_all", held_decode)
    async with running(make_settings(models="pixelcnn", max_batch_wait_ms=30_000)) as (app, client):
        worker = worker_of(app, "pixelcnn")
        gate = Gate(worker.model)
        submitted = count_submissions(worker)
        with anyio.fail_after(10):
            # Large enough to be decoded in the thread pool (service/offload.py); smaller ones decode
            # on the event loop, with nothing to wait for.
            big = b64(gray_png(1, size=(300, 300)))
            on_its_way = asyncio.create_task(
                client.post("/score", json={"model": "pixelcnn", "images": [big] * 2, "resize": True})
            )
            await wait_thread_event(decoding)
            assert app.state.registry.arrivals.expected("pixelcnn") == 1
            queued = asyncio.create_task(client.post("/score", json=ONE))
            await submitted.wait_for(1)  # the lone queued job: its batch waits for the one on its way
            release.set()
            responses = [await on_its_way, await queued]
        assert [r.status_code for r in responses] == [200, 200]
        assert gate.calls == [3]  # one pass: 1 + 2 images
        assert no_arrivals_left(app)


async def test_a_client_still_uploading_does_not_hold_batches(make_settings):
    async with running(make_settings(models="pixelcnn", max_batch_wait_ms=30_000)) as (app, client):
        body_sent = asyncio.Event()
        body = json.dumps({"model": "pixelcnn", "images": [b64(gray_png(1))]}).encode()
        uploading, sent = raw_post(app, "/score", body, body_sent=body_sent)
        with anyio.fail_after(10):
            assert (await client.post("/score", json=ONE)).status_code == 200  # no 30 s wait for it
            assert app.state.registry.arrivals.expected("pixelcnn") == 0
            body_sent.set()
            await uploading
        assert sent[0]["status"] == 200
        assert no_arrivals_left(app)


async def test_arrival_tickets_are_returned_whatever_the_outcome(make_settings):
    async with running(make_settings(models="pixelcnn,vae", max_upload_bytes=100_000)) as (app, client):
        await client.post("/score", json=ONE)  # 200
        await client.post("/score", json={"model": "nope", "images": ONE["images"]})  # 404
        await client.post("/score", json={"model": "pixelcnn", "images": ["@@"]})  # 422 after the model
        await client.post("/score", content=b"\xff", headers={"content-type": "application/json"})  # 422 before
        await client.post("/score", content=b"x" * 200_000, headers={"content-type": "application/json"})  # 413
        await client.post("/encode", json={"model": "pixelcnn", "images": ONE["images"]})  # 422
        await client.post("/sample", json={"model": "vae", "n": 2})
        await client.post("/sample/stream", json={"model": "pixelcnn", "n": 1})
        await client.get("/models")
        assert no_arrivals_left(app)


async def test_a_sampling_request_waiting_for_a_slot_is_not_on_its_way(make_settings):
    async with running(make_settings(models="pixelcnn", max_concurrent_samples=1)) as (app, client):
        worker = worker_of(app, "pixelcnn")
        with anyio.fail_after(10):
            async with worker.sample_slots:  # the one slot is taken
                waiting = asyncio.create_task(client.post("/sample", json={"model": "pixelcnn", "seed": 1}))
                while not worker.sample_slots._waiters:  # until the request waits for the slot
                    await asyncio.sleep(0)
                assert app.state.registry.arrivals.expected("pixelcnn") == 0
            assert (await waiting).status_code == 200
        assert no_arrivals_left(app)


def test_arrivals_count_per_model_once_the_model_is_known() -> None:
    from service.arrivals import Arrivals

    async def flow() -> None:
        arrivals = Arrivals()
        a = arrivals.enter()
        assert arrivals.expected("m") == arrivals.expected("other") == 1  # model not yet known
        arrivals.assign("m")
        assert (arrivals.expected("m"), arrivals.expected("other")) == (1, 0)
        arrivals.assign("other")  # a second lookup in the same request changes nothing
        assert (arrivals.expected("m"), arrivals.expected("other")) == (1, 0)
        arrivals.leave()
        arrivals.leave(a)  # idempotent
        assert arrivals.expected("m") == 0 and not arrivals.by_model and arrivals.unassigned == 0

    asyncio.run(flow())  # each request runs in its own context; so does this


async def test_requests_beyond_the_in_flight_limit_are_503_before_their_bodies_are_read(make_settings):
    async with running(make_settings(models="pixelcnn", max_concurrent_requests=2)) as (app, client):
        worker = worker_of(app, "pixelcnn")
        gate = Gate(worker.model, block=True)
        submitted = count_submissions(worker)
        with anyio.fail_after(10):
            held = [asyncio.create_task(client.post("/score", json=ONE)) for _ in range(2)]
            await submitted.wait_for(2)  # both in flight, the first one in the (held) model

            body_read = asyncio.Event()
            body = json.dumps(ONE).encode()

            async def receive() -> dict:
                body_read.set()
                return {"type": "http.request", "body": body, "more_body": False}

            sent: list[dict] = []

            async def send(message: dict) -> None:
                sent.append(message)

            scope = json_post_scope("/score", body)
            await app(scope, receive, send)
            assert sent[0]["status"] == 503 and not body_read.is_set()
            assert (b"retry-after", b"1") in sent[0]["headers"]
            assert json.loads(sent[1]["body"])["detail"] == (
                "the service is at its limit of 2 requests in flight (GENSERVE_MAX_CONCURRENT_REQUESTS); retry later"
            )
            assert (await client.get("/readyz")).status_code == 200  # probes are never refused
            assert (await client.get("/models")).status_code == 200
            gate.release.set()
            assert [(await t).status_code for t in held] == [200, 200]
            assert (await client.post("/score", json=ONE)).status_code == 200  # the slots came back
        labels = {"route": "unmatched", "model": "", "status": "503"}
        assert app.state.metrics.sample_value("genserve_requests_total", labels) == 1


async def trickle_request(
    app: Any, path: str, body: bytes, content_type: bytes, stalled: asyncio.Event
) -> list[dict[str, Any]]:
    """Drive ``app`` with a client that sends the first 10 bytes of ``body`` and then nothing more
    (it stays connected; ``stalled`` is set once the app waits for the rest); returns what the app sent."""
    scope = json_post_scope(path, body)
    scope["headers"] = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    messages = [{"type": "http.request", "body": body[:10], "more_body": True}]
    never = asyncio.Event()
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        stalled.set()
        await never.wait()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/score", b"application/json"),
        ("/sample", b"application/json"),
        ("/score", b"multipart/form-data; boundary=xyz"),
    ],
)
async def test_a_body_that_does_not_arrive_in_time_is_408_and_frees_its_place(make_settings, path, content_type):
    # A 2 s deadline leaves the refusal below a margin on a loaded machine (CI once saw the slow
    # request's 1 s deadline pass before the second request arrived).
    settings = make_settings(models="pixelcnn", max_concurrent_requests=1, body_timeout_s=2.0)
    async with running(settings) as (app, client):
        body = json.dumps(ONE).encode() if content_type == b"application/json" else b"--xyz\r\n" + b"x" * 100
        with anyio.fail_after(10):
            stalled = asyncio.Event()
            slow = asyncio.create_task(trickle_request(app, path, body, content_type, stalled))
            await stalled.wait()  # the slow client holds the only place: others are refused
            assert (await client.post("/score", json=ONE)).status_code == 503
            sent = await slow
        assert sent[0]["status"] == 408
        assert json.loads(sent[1]["body"])["detail"] == (
            "the request body did not arrive within 2 s of the request's start (GENSERVE_BODY_TIMEOUT_S); "
            "send it at once, or in smaller requests"
        )
        assert (await client.post("/score", json=ONE)).status_code == 200  # its place came back
        labels = {"route": path, "model": "", "status": "408"}
        assert app.state.metrics.sample_value("genserve_requests_total", labels) == 1


async def test_the_body_deadline_does_not_time_the_wait_for_a_disconnect(make_settings):
    # Reads after the body is complete (the watch for a client hanging up) are not timed: a request
    # that takes longer than the deadline to compute is answered 200.
    async with running(make_settings(models="pixelcnn", body_timeout_s=0.2)) as (app, client):
        worker = worker_of(app, "pixelcnn")
        gate = Gate(worker.model, block=True)
        with anyio.fail_after(10):
            task = asyncio.create_task(client.post("/score", json=ONE))
            await wait_thread_event(gate.entered)
            await asyncio.sleep(0.4)  # past the deadline, with the body long complete
            gate.release.set()
            assert (await task).status_code == 200


ORIGIN = "https://app.example.com"


async def test_cors_lets_the_configured_origins_call_from_a_browser(make_settings):
    async with running(make_settings(models="pixelcnn", api_keys="k", cors_origins=ORIGIN)) as (_, client):
        # The preflight carries no key (browsers never send one there) and is answered by CORS.
        pre = await client.options(
            "/score",
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "x-api-key, content-type",
            },
        )
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ORIGIN
        assert "POST" in pre.headers["access-control-allow-methods"]
        r = await client.post("/score", json=ONE, headers={"Origin": ORIGIN, "X-API-Key": "k"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
        no_key = await client.post("/score", json=ONE, headers={"Origin": ORIGIN})
        assert no_key.status_code == 401  # CORS opens the door to pages, not the keys
        assert no_key.headers["access-control-allow-origin"] == ORIGIN  # so the page can read the 401
        other = await client.post("/score", json=ONE, headers={"Origin": "https://evil.example", "X-API-Key": "k"})
        assert "access-control-allow-origin" not in other.headers


async def test_without_cors_origins_no_cors_headers_are_sent(make_settings):
    async with running(make_settings(models="pixelcnn")) as (_, client):
        r = await client.post("/score", json=ONE, headers={"Origin": ORIGIN})
        assert r.status_code == 200 and not any(h.startswith("access-control-") for h in r.headers)
        pre = await client.options("/score", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
        assert pre.status_code == 405 and "access-control-allow-origin" not in pre.headers


@pytest.mark.parametrize("regather", [0.0, 1.0])
async def test_a_batch_regathers_the_clients_the_last_pass_answered(make_settings, regather):
    async with running(make_settings(models="pixelcnn", batch_regather=regather)) as (app, client):
        worker = worker_of(app, "pixelcnn")
        gate = Gate(worker.model)
        worker._last_pass = (3, 20.0)  # the last pass answered 3 images in 20 s: wait up to 20 s * regather
        with anyio.fail_after(15):
            first = asyncio.create_task(client.post("/score", json=ONE))
            await asyncio.sleep(0.3)  # the two others return a moment later
            rest = [asyncio.create_task(client.post("/score", json=ONE)) for _ in range(2)]
            responses = [await first, *[await r for r in rest]]
        assert [r.status_code for r in responses] == [200, 200, 200]
        assert gate.calls == ([3] if regather else [1, 2])
        assert worker._last_pass[0] == (3 if regather else 2)


async def test_a_lone_client_never_waits_to_regather(make_settings):
    async with running(make_settings(models="pixelcnn", batch_regather=1.0)) as (app, client):
        worker = worker_of(app, "pixelcnn")
        worker._last_pass = (1, 60.0)  # a wait of up to 60 s, were it to wait
        with anyio.fail_after(10):
            for _ in range(3):
                assert (await client.post("/score", json=ONE)).status_code == 200
