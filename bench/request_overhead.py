"""The event loop's own cost per /score request: CPU seconds of the loop's thread, thread hops.

Drives the app in this process at the ASGI level (no sockets, no HTTP client: nothing else on the
loop's thread) with ``--requests`` one-image /score requests, ``--concurrency`` at a time, against
a tiny PixelCNN of the shipped models' input shape (28x28 grey, 256 levels) whose forward pass costs
little, so that what is measured is the server's per-request work, the part that bounds a GPU
worker (docs/gpu.md). Prints the loop thread's CPU time per request (``time.thread_time``, not wall
time: another process on the machine does not inflate it), the thread-pool hand-offs per request,
and wall requests/s (which a loaded machine does inflate).

    python bench/request_overhead.py --requests 2000 [--json]
    python bench/request_overhead.py --save-tiny runs/tiny    # the same model for bench/peer_bench.py --model-dir
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import anyio.to_thread
import numpy as np
import torch
from PIL import Image


def tiny_store(root: Path) -> None:
    from models.checkpoint import save_checkpoint
    from models.pixelcnn import PixelCNN, PixelCNNConfig

    torch.manual_seed(0)
    cfg = PixelCNNConfig(in_channels=1, height=28, width=28, levels=256, hidden=8, n_blocks=1, first_kernel=3,
                         kernel=3, out_hidden=16)  # fmt: skip
    dataset = {"spec": "bench", "name": "bench", "shape": [1, 28, 28], "levels": 256, "classes": None}
    save_checkpoint(PixelCNN(cfg), root / "tiny", dataset=dataset)


def body() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    image = base64.b64encode(buf.getvalue()).decode()
    return json.dumps({"model": "tiny", "images": [image], "score_type": "nll"}).encode()


def scope(data: bytes) -> dict[str, Any]:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/score", "raw_path": b"/score", "query_string": b"", "root_path": "", "headers": headers,
        "client": ("127.0.0.1", 1), "server": ("bench", 80),
    }  # fmt: skip


async def one(app: Any, data: bytes) -> int:
    sent = False
    status: list[int] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": data, "more_body": False}
        await asyncio.Event().wait()  # the client never hangs up
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope(data), receive, send)
    return status[0]


async def run(args: argparse.Namespace, store: Path) -> dict[str, Any]:
    from service.app import create_app
    from service.settings import Settings

    hops = 0
    original = anyio.to_thread.run_sync  # what starlette's run_in_threadpool hands each call to

    async def counting(*a: Any, **k: Any) -> Any:
        nonlocal hops
        hops += 1
        return await original(*a, **k)

    anyio.to_thread.run_sync = counting  # count every hop
    app = create_app(Settings(model_dir=store, torch_threads=1))
    data = body()
    async with app.router.lifespan_context(app):
        await app.state.registry.wait_loaded()
        for _ in range(50):  # warm-up
            await one(app, data)
        gate = asyncio.Semaphore(args.concurrency)

        async def limited() -> int:
            async with gate:
                return await one(app, data)

        hops = 0
        cpu0, wall0 = time.thread_time(), time.perf_counter()
        statuses = await asyncio.gather(*[limited() for _ in range(args.requests)])
        cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0
    return {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "ok": statuses.count(200),
        "loop_cpu_ms_per_request": 1000 * cpu / args.requests,
        "thread_hops_per_request": hops / args.requests,
        "requests_per_s": args.requests / wall,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--json", action="store_true")
    p.add_argument("--save-tiny", metavar="DIR", help="only write the tiny checkpoint to DIR/tiny (for the peer bench)")
    args = p.parse_args()
    if args.save_tiny:
        tiny_store(Path(args.save_tiny))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tiny_store(Path(tmp))
        result = asyncio.run(run(args, Path(tmp)))
    if args.json:
        print(json.dumps(result))  # noqa: T201 - the benchmark's output
        return
    print(  # noqa: T201
        f"{result['ok']}/{result['requests']} answered 200, {result['concurrency']} at a time\n"
        f"event-loop CPU per request: {result['loop_cpu_ms_per_request']:.3f} ms\n"
        f"thread-pool hops per request: {result['thread_hops_per_request']:.2f}\n"
        f"requests/s (wall, machine-dependent): {result['requests_per_s']:.0f}"
    )


if __name__ == "__main__":
    main()
