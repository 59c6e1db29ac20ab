"""Request ids, one log line per request, and the last-resort 500.

Every response carries ``X-Request-ID`` (the client's own, when it sent a sane one). Anything a
route did not expect is logged with its traceback and the request id; the client gets a generic
500 ``{"detail": "internal error", "request_id": ...}`` and no traceback.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import route_template

logger = logging.getLogger("genserve.access")
REQUEST_ID_HEADER = "x-request-id"
SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Request ids: a random prefix per process and a counter, 32 hex digits like a uuid4's, unique across
# processes and restarts without a call into the OS's random source per request (which is slow on
# some virtual machines: 0.45 ms a request here, bench/request_overhead.py).
_ID_PREFIX = uuid.uuid4().hex[:20]
_ID_COUNTER = itertools.count()


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER) % (1 << 48):012x}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and a record's ``fields`` if any."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_json_logs() -> None:
    """Switch every root handler (adding one if there is none) to JSON lines."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
        root.setLevel(logging.INFO)
    for handler in root.handlers:
        handler.setFormatter(JsonFormatter())


def request_id(scope: Scope) -> str | None:
    return scope.get("state", {}).get("request_id")


class RequestLogMiddleware:
    """Outermost middleware: assigns the request id, logs the request, turns crashes into a plain 500."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        rid = incoming if SANE_ID.match(incoming) else new_request_id()
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = rid
        status: int | None = None

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), rid.encode())]
            await send(message)

        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_wrapper)
        except asyncio.CancelledError:
            status = 499  # the client went away
            raise
        except Exception:
            logger.exception("request %s failed", rid)
            if status is not None:  # too late for a clean answer; the client sees a cut response
                return
            body = json.dumps({"detail": "internal error", "request_id": rid}).encode()
            await send_wrapper(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                }
            )
            await send({"type": "http.response.body", "body": body})
        finally:
            fields = {
                "request_id": rid,
                "method": scope["method"],
                "route": route_template(scope),
                "path": scope["path"],
                "model": state.get("model"),
                "images": state.get("images"),
                "status": status,
                "latency_ms": round((time.perf_counter() - start) * 1000.0, 2),
            }
            logger.info(" ".join(f"{k}={v}" for k, v in fields.items() if v is not None), extra={"fields": fields})
