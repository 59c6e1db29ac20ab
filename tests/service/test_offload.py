"""Small request work stays on the event loop, large work goes to the thread pool (service/offload.py);
request ids without the OS's random source."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import anyio.to_thread
import numpy as np
import pytest

from service.logs import SANE_ID, new_request_id
from service.offload import INLINE_DECODE_BYTES, run_off_loop
from tests.service.helpers import b64, gray_png, png_bytes, running

pytestmark = pytest.mark.anyio


@pytest.fixture
def hops(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The name of every function handed to the thread pool (starlette and FastAPI go through anyio)."""
    seen: list[str] = []
    original = anyio.to_thread.run_sync

    async def counting(fn: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(getattr(getattr(fn, "func", fn), "__name__", repr(fn)))  # starlette passes a partial
        return await original(fn, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
    yield seen


async def test_small_work_runs_on_the_loop_and_large_work_in_the_pool() -> None:
    loop_thread = threading.get_ident()
    assert await run_off_loop(True, threading.get_ident) == loop_thread
    assert await run_off_loop(False, threading.get_ident) != loop_thread
    assert await run_off_loop(True, lambda a, *, b: a + b, 1, b=2) == 3


async def test_a_small_score_request_makes_no_thread_hop(make_settings, hops) -> None:
    async with running(make_settings(models="pixelcnn")) as (_, client):
        hops.clear()  # startup's own
        r = await client.post("/score", json={"model": "pixelcnn", "images": [b64(gray_png(1))]})
        assert r.status_code == 200, r.text
        assert hops == []
        r = await client.post("/score", json={"model": "pixelcnn", "images": [b64(gray_png(1))], "heatmap": True})
        assert r.status_code == 200 and r.json()["results"][0]["heatmap"]
        assert len(hops) == 1  # the heatmap PNGs are built off the loop


async def test_a_small_upload_to_convert_is_decoded_off_the_loop(make_settings, hops) -> None:
    flat = png_bytes(np.zeros((1500, 1500), dtype=np.uint8))  # a few KiB of PNG, 2.25 million pixels
    assert len(flat) < INLINE_DECODE_BYTES
    async with running(make_settings(models="pixelcnn")) as (_, client):
        hops.clear()
        r = await client.post("/score", json={"model": "pixelcnn", "images": [b64(flat)]})
        assert r.status_code == 422 and "resize" in r.text  # refused from its header, on the loop
        assert hops == []
        r = await client.post("/score", json={"model": "pixelcnn", "images": [b64(flat)], "resize": True})
        assert r.status_code == 200, r.text
        assert hops == ["decode_all"]


async def test_a_large_upload_is_decoded_off_the_loop(make_settings, hops) -> None:
    big = gray_png(2, size=(300, 300))  # random pixels: the PNG barely compresses
    assert len(big) > INLINE_DECODE_BYTES
    async with running(make_settings(models="pixelcnn")) as (_, client):
        hops.clear()
        r = await client.post("/score", json={"model": "pixelcnn", "images": [b64(big)], "resize": True})
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["resized"] is True
        assert "decode_all" in hops


async def test_request_ids_are_unique_sane_and_uuid_sized() -> None:
    ids = [new_request_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and SANE_ID.match(i) and int(i, 16) >= 0 for i in ids)
    # two requests in flight at once get different ids too
    a, b = await asyncio.gather(asyncio.to_thread(new_request_id), asyncio.to_thread(new_request_id))
    assert a != b
