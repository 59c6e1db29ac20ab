"""Request limits at the door: body size (refused on Content-Length at once, and counted while
reading) and work requests in flight (refused before their bodies are read). Together they bound the
memory uploads can take: GENSERVE_MAX_CONCURRENT_REQUESTS x GENSERVE_MAX_UPLOAD_BYTES."""

from __future__ import annotations

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
