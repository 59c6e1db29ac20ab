"""Stop waiting for a model when the client hangs up.

Uvicorn does not cancel a route when its client disconnects; it only answers the next ``receive()``
with ``http.disconnect``. :func:`unless_disconnected` races the work against that message and
cancels the work first, which drops its job from the worker's queue (``Worker.run``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

from service.errors import ServiceError

T = TypeVar("T")


class ClientDisconnected(ServiceError):
    """The client went away; nobody reads this answer (nginx's 499 in logs and metrics)."""

    status_code = 499


async def wait_for_disconnect(request: Request) -> None:
    """Return when the client disconnects. Call only after the body has been read."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not task.cancelled() and task.done():
        return task.result()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientDisconnected("client disconnected before the answer was ready")
