"""POST /sample/stream: sampling progress as Server-Sent Events (works with ``curl -N``).

Events, each ``event: NAME`` and one ``data:`` line of JSON:
- ``start``: ``{"model", "seed", "n", "rows"}`` once the request is accepted;
- ``progress``: ``{"rows_done", "rows"}`` after every image row;
- ``partial``: ``{"rows_done", "images": [base64 PNG, ...]}`` every ``partial_every`` rows (rows not yet
  drawn are black);
- ``result``: the same JSON object ``POST /sample`` answers, then the stream ends;
- ``error``: ``{"status", "detail"}`` if the work fails after the stream started, then the stream ends.

While nothing else is sent (the request waits for a sampling slot), a comment line ``: keep-alive``
goes out every KEEPALIVE_S seconds, so that proxies and load balancers that close idle connections
(nginx and AWS load balancers after 60 s) keep the stream open; EventSource clients ignore comments.

A client that disconnects cancels its share of the batched generation after the current row, and
its sampling slot is free at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from torch import Tensor

from service import images
from service.deps import AppMetrics, Registry
from service.errors import ServiceError
from service.jobs import SampleResult
from service.metrics import Metrics
from service.samples import CheckedSample, SampleCall, pngs, sample_response
from service.schemas import MODEL_ERRORS

router = APIRouter(tags=["sample"])
KEEPALIVE_S = 15.0
KEEPALIVE = b": keep-alive\n\n"
logger = logging.getLogger("genserve.sample")


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One Server-Sent Event."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


# (rows done, snapshot or None) per row, then None once the work has ended.
Events = asyncio.Queue[tuple[int, Tensor | None] | None]


async def stream(
    call: SampleCall, work: asyncio.Future[SampleResult], events: Events, metrics: Metrics
) -> AsyncIterator[bytes]:
    """The events of one stream, from the row reports in ``events`` and the work's result.

    One task reads the queue: this generator's own, so a client that goes away (the generator
    closed mid-await) leaves no reader behind, and its share of the generation is dropped."""
    entry, rows = call.entry, call.entry.shape[1]
    try:
        yield sse("start", {"model": entry.name, "seed": call.seed, "n": call.n, "rows": rows})
        while True:
            try:
                async with asyncio.timeout(KEEPALIVE_S):
                    event = await events.get()
            except TimeoutError:
                yield KEEPALIVE
                continue
            if event is None:
                break
            done, snapshot = event
            yield sse("progress", {"rows_done": done, "rows": rows})
            if snapshot is not None:
                partial = await run_in_threadpool(pngs, images.from_levels(snapshot.numpy(), entry.levels))
                yield sse("partial", {"rows_done": done, "images": partial})
        try:
            result = work.result()
        except ServiceError as e:
            yield sse("error", {"status": e.status_code, "detail": e.detail})
            return
        except Exception:
            logger.exception("sample stream for model '%s' failed", entry.name)
            yield sse("error", {"status": 500, "detail": "internal error"})
            return
        metrics.images_sampled.labels(model=entry.name).inc(call.n)
        answer = await run_in_threadpool(sample_response, call, result)
        yield sse("result", answer.model_dump())
    finally:
        if not work.done():  # the client went away: drop its share of the generation
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, ServiceError):
                await work


@router.post(
    "/sample/stream",
    summary="Draw images, streaming progress and partial images (Server-Sent Events)",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "start, progress, partial, result"},
        404: MODEL_ERRORS[404],  # errors once the stream has started come as an `error` event
    },
)
async def sample_stream(
    call: CheckedSample,
    registry: Registry,
    metrics: AppMetrics,
    partial_every: int = Query(4, ge=1, le=1024, description="send partial images every N rows"),
) -> StreamingResponse:
    entry, seed = call.entry, call.seed
    rows = entry.shape[1]
    loop = asyncio.get_running_loop()
    # Rows are put from the worker thread through the loop, before the work's result, so the end
    # (None) always comes last.
    events: Events = asyncio.Queue()

    def on_row(done: int, partial: Tensor) -> None:  # runs on the worker thread
        snapshot = partial.to("cpu", copy=True) if done % partial_every == 0 and done < rows else None
        loop.call_soon_threadsafe(events.put_nowait, (done, snapshot))

    work = asyncio.ensure_future(
        registry.sample(entry, n=call.n, seed=seed, temperature=call.temperature, label=call.label, on_row=on_row)
    )
    work.add_done_callback(lambda _: events.put_nowait(None))

    return StreamingResponse(
        stream(call, work, events, metrics),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Seed": str(seed)},
    )
