"""Batched /sample across requests, and the /sample/stream Server-Sent Events endpoint."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import anyio
import pytest

import service.routes.sample_stream
from tests.service.helpers import Gate, b64, gray_png, json_post_scope, running, worker_of

pytestmark = pytest.mark.anyio

ONE = {"model": "pixelcnn", "images": [b64(gray_png())]}


async def wait_thread_event(event: threading.Event) -> None:
    assert await anyio.to_thread.run_sync(event.wait, 10), "event not set within 10 s"


def parse_sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    """The events of a stream, without its comments (``: keep-alive``)."""
    events = []
    for block in text.strip().split("\n\n"):
        if block.startswith(":"):
            continue
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((lines["event"], json.loads(lines["data"])))
    return events


async def stream_tasks_left() -> list[asyncio.Task[Any]]:
    """Tasks still pending on a stream's event queue once the loop has had a few turns (a stream
    that ended must leave none: asyncio logs "Task was destroyed but it is pending!" for each)."""
    for _ in range(5):
        await asyncio.sleep(0)
    return [t for t in asyncio.all_tasks() if not t.done() and "Queue.get" in repr(t.get_coro())]


def record_sample_batches(worker: Any) -> list[list[int]]:
    """Patch a worker's model to record the part sizes of every batched generation."""
    calls: list[list[int]] = []
    original = worker.model.sample_parts

    def sample_parts(parts: list[Any], *, between_steps: Any = None) -> Any:
        calls.append([p.n for p in parts])
        return original(parts, between_steps=between_steps)

    worker.model.sample_parts = sample_parts
    return calls


async def test_waiting_sample_requests_run_as_one_batched_generation(make_settings):
    async with running(make_settings(models="pixelcnn")) as (app, client):
        worker = worker_of(app, "pixelcnn")
        solo = {}
        for seed in (1, 2, 3):
            r = await client.post("/sample", json={"model": "pixelcnn", "n": seed, "seed": seed})
            solo[seed] = r.json()["images"]
        calls = record_sample_batches(worker)
        gate = Gate(worker.model, block=True)  # hold the worker thread on a /score pass
        first = asyncio.create_task(client.post("/score", json=ONE))
        await wait_thread_event(gate.entered)
        tasks = [
            asyncio.create_task(client.post("/sample", json={"model": "pixelcnn", "n": seed, "seed": seed}))
            for seed in (1, 2, 3)
        ]
        while worker.load < 1 + 1 + 2 + 3:  # the score job and the three sample jobs are queued
            await asyncio.sleep(0.01)
        gate.release.set()
        assert (await first).status_code == 200
        answers = [await t for t in tasks]
        assert sorted(map(sorted, calls)) == [[1, 2, 3]]  # one generation for all three requests
        for seed, r in zip((1, 2, 3), answers, strict=True):
            assert r.status_code == 200
            assert r.json()["images"] == solo[seed]  # the same images as alone, for the same seed
        assert (
            app.state.metrics.sample_value(
                "genserve_batch_images_count", {"model": "pixelcnn", "device": "cpu", "worker": "0", "op": "sample"}
            )
            >= 1
        )


async def test_stream_sends_start_progress_partial_and_result(make_settings):
    async with running(make_settings(models="pixelcnn")) as (_, client):
        body = {"model": "pixelcnn", "n": 2, "seed": 7}
        r = await client.post("/sample/stream?partial_every=3", json=body)
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(r.text)
        names = [e for e, _ in events]
        assert names[0] == "start" and names[-1] == "result"
        assert events[0][1] == {"model": "pixelcnn", "seed": 7, "n": 2, "rows": 8}
        progress = [d["rows_done"] for e, d in events if e == "progress"]
        assert progress == list(range(1, 9))
        partial = [d for e, d in events if e == "partial"]
        assert [d["rows_done"] for d in partial] == [3, 6]
        assert all(len(d["images"]) == 2 for d in partial)
        result = events[-1][1]
        plain = (await client.post("/sample", json=body)).json()
        assert result["images"] == plain["images"] and result["seed"] == 7
        assert result["bits_per_dim"] == pytest.approx(plain["bits_per_dim"])
        assert await stream_tasks_left() == []


async def test_stream_errors_before_start_are_plain_http(make_settings):
    async with running(make_settings(models="pixelcnn", max_samples=2)) as (_, client):
        r = await client.post("/sample/stream", json={"model": "pixelcnn", "n": 3})
        assert r.status_code == 422 and "GENSERVE_MAX_SAMPLES" in r.json()["detail"]
        r = await client.post("/sample/stream", json={"model": "nope"})
        assert r.status_code == 404


async def test_a_cancelled_stream_stops_its_generation_and_frees_its_slot(make_settings):
    async with running(make_settings(models="pixelcnn", max_concurrent_samples=1, request_timeout_s=10)) as (
        app,
        client,
    ):
        worker = worker_of(app, "pixelcnn")
        rows_seen: list[int] = []
        row1, proceed = threading.Event(), threading.Event()
        original = worker.model.sample_parts

        def slow_sample_parts(parts: list[Any], *, between_steps: Any = None) -> Any:
            for part in parts:
                inner = part.on_row

                def on_row(rows: int, images: Any, inner: Any = inner) -> None:
                    rows_seen.append(rows)
                    if inner is not None:
                        inner(rows, images)
                    if rows == 1:
                        row1.set()
                        proceed.wait(10)

                part.on_row = on_row
            return original(parts, between_steps=between_steps)

        worker.model.sample_parts = slow_sample_parts

        body = json.dumps({"model": "pixelcnn", "n": 2, "seed": 3}).encode()
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        hang_up = asyncio.Event()
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop(0)
            await hang_up.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = json_post_scope("/sample/stream", body)
        call = asyncio.create_task(app(scope, receive, send))
        await wait_thread_event(row1)
        assert sent[0]["status"] == 200
        hang_up.set()  # the client goes away mid-generation
        await asyncio.wait_for(call, 10)
        assert worker.sample_slots._value == 1  # the slot is free at once
        proceed.set()
        # The generation stops after the row in progress, and the next request gets the slot.
        r = await client.post("/sample", json={"model": "pixelcnn", "n": 1, "seed": 1})
        assert r.status_code == 200
        # the cancelled generation left after row 2 (reporting only row 1); then the new one ran all 8
        assert rows_seen == [1, *range(1, 9)]
        assert await stream_tasks_left() == []


async def test_cuda_graphs_setting_is_ignored_by_cpu_workers(make_settings: Any) -> None:
    body = {"model": "pixelcnn", "n": 2, "seed": 4}
    async with running(make_settings(models="pixelcnn", cuda_graphs=True)) as (app, client):
        assert worker_of(app, "pixelcnn").model.sample_cuda_graphs is False
        with_setting = (await client.post("/sample", json=body)).json()
    async with running(make_settings(models="pixelcnn")) as (_, client):
        without = (await client.post("/sample", json=body)).json()
    assert with_setting["images"] == without["images"]


async def test_a_stream_waiting_for_its_slot_sends_keep_alive_comments(make_settings, monkeypatch):
    monkeypatch.setattr(service.routes.sample_stream, "KEEPALIVE_S", 0.05)
    async with running(make_settings(models="pixelcnn")) as (app, client):
        worker = worker_of(app, "pixelcnn")
        gate = Gate(worker.model, block=True)  # the worker is busy with a /score pass
        first = asyncio.create_task(client.post("/score", json=ONE))
        await wait_thread_event(gate.entered)
        stream = asyncio.create_task(client.post("/sample/stream", json={"model": "pixelcnn", "n": 1, "seed": 2}))
        await asyncio.sleep(0.5)  # about ten intervals with nothing to send
        gate.release.set()
        r = await stream
        assert (await first).status_code == 200
        blocks = r.text.strip().split("\n\n")
        assert blocks[0].startswith("event: start") and blocks[1] == ": keep-alive"
        assert blocks.count(": keep-alive") >= 3
        assert "event: progress" not in "\n\n".join(blocks[: blocks.index(": keep-alive")])
        assert parse_sse(r.text)[-1][0] == "result"
