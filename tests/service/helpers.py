"""Helpers for the service tests: images, an in-process app with its lifespan, an instrumented model."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image

# ---- images -------------------------------------------------------------------------------------


def png_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def gray_png(seed: int = 0, size: tuple[int, int] = (8, 8)) -> bytes:
    """A random 8-bit grayscale PNG, height x width = size."""
    rng = np.random.default_rng(seed)
    return png_bytes(rng.integers(0, 256, size=size, dtype=np.uint8))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def decode_png(text: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(text)))
    im.load()
    return im


# ---- the app in-process ----------------------------------------------------------------------------


@asynccontextmanager
async def running(settings: Any, *, wait: bool = True) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """The app with its lifespan running (models loaded unless wait=False) and a client for it."""
    from service.app import create_app

    app = create_app(settings)
    async with app.router.lifespan_context(app):
        if wait:
            await app.state.registry.wait_loaded()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield app, client


def json_post_scope(path: str, body: bytes) -> dict[str, Any]:
    """The ASGI scope of a JSON POST of ``body`` to ``path``, for tests that drive the app by hand
    (their own ``receive``: a body held back, a client that hangs up)."""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
        "client": ("127.0.0.1", 1), "server": ("test", 80),
    }  # fmt: skip


class Gate:
    """Instruments one loaded model: records each log_prob batch size, and can hold the worker thread.

    ``entered`` (and ``any_entered``, if given) is set when a forward pass starts; with ``block=True``
    the pass waits for ``release``.
    """

    def __init__(
        self, model: torch.nn.Module, *, block: bool = False, any_entered: threading.Event | None = None
    ) -> None:
        self.calls: list[int] = []
        self.threads: list[int] = []  # torch's CPU threads in each pass
        self.entered = threading.Event()
        shared = any_entered or threading.Event()  # set too, for a test that waits on several gates
        self.release = threading.Event()
        if not block:
            self.release.set()
        original = model.log_prob

        def log_prob(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
            self.calls.append(int(x.shape[0]))
            self.threads.append(torch.get_num_threads())
            self.entered.set()
            shared.set()
            assert self.release.wait(timeout=30), "test never released the gate"
            return original(x, y)

        model.log_prob = log_prob  # instance attribute shadows the method


def worker_of(app: Any, model: str, index: int = 0) -> Any:
    return app.state.registry.get(model).workers[index]


async def post_json(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> httpx.Response:
    """client.post with a JSON body, for task groups (start_soon takes no keyword arguments)."""
    return await client.post(path, json=body)
