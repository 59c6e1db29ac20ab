"""Which model version answers a request, and when an old version has no request left (its drain).

:meth:`ModelRegistry.get <service.registry.ModelRegistry.get>` hands a request the serving
:class:`~service.entries.ModelEntry` and leases it: the entry counts the request among its
``holders`` until the response has been sent. A reload (service/lifecycle.py) swaps the registry's
entry for a new one, so later requests get the new version while the ones holding the old entry
finish on its workers; once the old entry's holders reach 0 its workers close. The middleware also
names the answering version in the ``X-Model-SHA256`` header (and ``X-Model-Version``).
"""

from __future__ import annotations

import asyncio
from contextvars import ContextVar
from typing import TYPE_CHECKING

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from service.entries import ModelEntry

SHA256_HEADER = "X-Model-SHA256"
VERSION_HEADER = "X-Model-Version"

_held: ContextVar[list[ModelEntry] | None] = ContextVar("genserve_leased_entries", default=None)
_idle: dict[int, asyncio.Event] = {}  # id(entry) -> set when its holders reach 0, for a drain waiting on it


def lease(entry: ModelEntry) -> None:
    """Count the current request among ``entry``'s holders until its response ends (no-op outside a request)."""
    held = _held.get()
    if held is None:
        return
    held.append(entry)
    entry.holders += 1


def _release(entry: ModelEntry) -> None:
    entry.holders -= 1
    if entry.holders == 0 and id(entry) in _idle:
        _idle[id(entry)].set()


async def drained(entry: ModelEntry, timeout_s: float) -> bool:
    """Wait until no request holds ``entry`` (True), or ``timeout_s`` has passed (False)."""
    if entry.holders == 0:
        return True
    event = _idle.setdefault(id(entry), asyncio.Event())
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
        return True
    except TimeoutError:
        return False
    finally:
        _idle.pop(id(entry), None)


class LeaseMiddleware:
    """Holds the leases of one HTTP request and names the version that answered it in a header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: list[ModelEntry] = []
        token = _held.set(held)

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start" and held:
                headers = MutableHeaders(scope=message)
                headers[SHA256_HEADER] = held[-1].sha256
                headers[VERSION_HEADER] = str(held[-1].version)
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            _held.reset(token)
            for entry in held:
                _release(entry)
