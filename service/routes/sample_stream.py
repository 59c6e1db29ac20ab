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
import secrets
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from torch import Tensor

from models.likelihood import bits_per_dim
from service import images
from service.deps import AppMetrics, AppSettings, Registry
from service.errors import BadRequest, ServiceError
from service.routes.sample import ERRORS
from service.schemas import SampleRequest, SampleResponse

router = APIRouter(tags=["sample"])
KEEPALIVE_S = 15.0
KEEPALIVE = b": keep-alive\n\n"
logger = logging.getLogger("genserve.sample")


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One Server-Sent Event."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _pngs(pixels: np.ndarray) -> list[str]:
    return [images.b64(images.encode_png(p)) for p in pixels]


@router.post(
    "/sample/stream",
    summary="Draw images, streaming progress and partial images (Server-Sent Events)",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "start, progress, partial, result"},
        404: ERRORS[404],  # errors once the stream has started come as an `error` event
    },
)
async def sample_stream(
    body: SampleRequest,
    request: Request,
    registry: Registry,
    settings: AppSettings,
    metrics: AppMetrics,
    partial_every: int = Query(4, ge=1, le=1024, description="send partial images every N rows"),
) -> StreamingResponse:
    entry = registry.get(body.model)
    request.state.model = entry.name
    request.state.images = body.n
    if body.n > settings.max_samples:
        raise BadRequest(
            f"n={body.n} is over the limit of {settings.max_samples} samples per request (GENSERVE_MAX_SAMPLES)"
        )
    label = entry.label_index(body.label)
    seed = body.seed if body.seed is not None else secrets.randbelow(2**53)
    rows = entry.shape[1]
    loop = asyncio.get_running_loop()
    # (rows done, snapshot or None) per row, then None once the work has ended. Rows are put from the
    # worker thread through the loop, before the work's result, so the end always comes last.
    events: asyncio.Queue[tuple[int, Tensor | None] | None] = asyncio.Queue()

    def on_row(done: int, partial: Tensor) -> None:  # runs on the worker thread
        snapshot = partial.to("cpu", copy=True) if done % partial_every == 0 and done < rows else None
        loop.call_soon_threadsafe(events.put_nowait, (done, snapshot))

    work = asyncio.ensure_future(
        registry.sample(entry, n=body.n, seed=seed, temperature=body.temperature or 1.0, label=label, on_row=on_row)
    )
    work.add_done_callback(lambda _: events.put_nowait(None))

    async def stream() -> AsyncIterator[bytes]:
        # One task reads the queue: this generator's own, so a client that goes away (the generator
        # closed mid-await) leaves no reader behind.
        try:
            yield sse("start", {"model": entry.name, "seed": seed, "n": body.n, "rows": rows})
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
                    pngs = await run_in_threadpool(_pngs, images.from_levels(snapshot.numpy(), entry.levels))
                    yield sse("partial", {"rows_done": done, "images": pngs})
            try:
                result = work.result()
            except ServiceError as e:
                yield sse("error", {"status": e.status_code, "detail": e.detail})
                return
            except Exception:
                logger.exception("sample stream for model '%s' failed", entry.name)
                yield sse("error", {"status": 500, "detail": "internal error"})
                return
            metrics.images_sampled.labels(model=entry.name).inc(body.n)
            pixels = images.from_levels(result.images.numpy(), entry.levels)
            log_prob = None if result.log_prob is None else result.log_prob.double()
            answer = SampleResponse(
                model=entry.name,
                seed=seed,
                label=label,
                images=await run_in_threadpool(_pngs, pixels),
                bits_per_dim=None
                if log_prob is None
                else [float(v) for v in np.asarray(bits_per_dim(log_prob, entry.dims)).reshape(-1)],
                log_likelihood_nats=None if log_prob is None else [float(v) for v in log_prob],
            )
            yield sse("result", answer.model_dump())
        finally:
            if not work.done():  # the client went away: drop its share of the generation
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError, ServiceError):
                    await work

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Seed": str(seed)}
    )
