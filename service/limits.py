"""Request limits at the door: body size (refused on Content-Length at once, and counted while
reading), the time a body may take to arrive, and work requests in flight (refused before their
bodies are read). Together they bound the memory uploads can take (GENSERVE_MAX_CONCURRENT_REQUESTS x
GENSERVE_MAX_UPLOAD_BYTES) and how long a slow client can hold a place among those requests."""

from __future__ import annotations

import asyncio
import json

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def too_large_detail(limit: int) -> str:
    return f"request body is larger than {limit} bytes (GENSERVE_MAX_UPLOAD_BYTES); send fewer or smaller images"


class BodySizeLimitMiddleware:
    """413 when the body exceeds ``max_bytes``: declared (Content-Length) or as it streams in."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised inside the route's body read; FastAPI passes HTTPExceptions through.
                    raise HTTPException(status_code=413, detail=too_large_detail(self.max_bytes))
            return message

        await self.app(scope, limited_receive, send)

    async def _refuse(self, send: Send) -> None:
        await send_json(send, 413, {"detail": too_large_detail(self.max_bytes)})


def body_timeout_detail(timeout_s: float) -> str:
    return (
        f"the request body did not arrive within {timeout_s:g} s of the request's start "
        "(GENSERVE_BODY_TIMEOUT_S); send it at once, or in smaller requests"
    )


class BodyTimeoutMiddleware:
    """408 when a request's body has not fully arrived ``timeout_s`` after its headers did.

    Without it a client that trickles its body (a byte now and then: "slow POST") holds its place
    among GENSERVE_MAX_CONCURRENT_REQUESTS for as long as it likes, and enough such clients refuse
    everyone else. Like nginx's ``client_body_timeout``, but a deadline for the whole body rather
    than for each read, which a byte per interval would defeat. Once the body is complete, reads
    (the wait for a disconnect) pass through untimed.
    """

    def __init__(self, app: ASGIApp, *, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        body_done = False

        async def timed_receive() -> Message:
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                # A timer on this task, not wait_for's task per read: the loop's work per request.
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                # Raised inside the route's body read, as the size limit's 413 is.
                raise HTTPException(status_code=408, detail=body_timeout_detail(self.timeout_s)) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        await self.app(scope, timed_receive, send)


class ConcurrencyLimitMiddleware:
    """503 at once, with Retry-After, for a POST (the work routes) beyond ``max_requests`` in flight,
    before its body is read. GET routes (health, readiness, metrics, model info) always pass."""

    def __init__(self, app: ASGIApp, *, max_requests: int) -> None:
        self.app = app
        self.max_requests = max_requests
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_requests:
            detail = (
                f"the service is at its limit of {self.max_requests} requests in flight "
                "(GENSERVE_MAX_CONCURRENT_REQUESTS); retry later"
            )
            await send_json(send, 503, {"detail": detail}, headers=[(b"retry-after", b"1")])
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


async def send_json(
    send: Send, status: int, content: dict[str, str], *, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """A whole JSON response from a middleware (no route, no framework)."""
    body = json.dumps(content).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})
