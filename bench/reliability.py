"""Reliability campaign (docs/reliability.md): reloads under load, a soak, and faults, on loopback.

Each campaign starts ``genserve serve`` as a subprocess on 127.0.0.1 with a model store of its own in
a temporary folder (by default a tiny 8x8 PixelCNN written here, so that a 2-core machine can drive
it; ``--model`` copies a real checkpoint folder instead) and drives it with a mixed load of
``/score`` (70%), ``/sample`` (20%) and ``/sample/stream`` (10%) from ``--clients`` concurrent loops.

- ``reload``: ``--baseline-s`` of load alone, then the same load while the model is offered
  ``--reloads`` good versions and ``--broken`` broken ones (weights that fail the sha256 check),
  one every ``--every-s``, through the admin API. Failed requests and p50/p99 per phase.
- ``soak``: ``--duration-s`` of load; every 10 s the server's resident memory, open file descriptors
  and threads (/proc). Non-200 answers by status; growth after the first 20% (warm-up).
- ``sigterm``: ``--in-flight`` /sample requests in flight, then SIGTERM: each must end in an answer
  (200 or a clear 503) or a refused connection, and the server must exit within its drain.

Bounded: every campaign stops after its stated seconds, every request has a timeout.

    python bench/reliability.py reload --json /tmp/reload.json
    python bench/reliability.py soak --duration-s 600
    python bench/reliability.py sigterm
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

logger = logging.getLogger("bench.reliability")

ADMIN_KEY = "bench-admin"
MODEL = "m"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("campaign", choices=("reload", "soak", "sigterm"))
    p.add_argument("--model", type=Path, help="a checkpoint folder to serve (default: a tiny PixelCNN)")
    p.add_argument("--clients", type=int, default=4, help="concurrent client loops")
    p.add_argument("--baseline-s", type=float, default=30.0, help="reload: seconds of load without reloads")
    p.add_argument("--reloads", type=int, default=10, help="reload: good versions offered")
    p.add_argument("--broken", type=int, default=2, help="reload: broken versions offered")
    p.add_argument("--every-s", type=float, default=3.0, help="reload: seconds between offers")
    p.add_argument("--duration-s", type=float, default=120.0, help="soak: seconds of load")
    p.add_argument("--in-flight", type=int, default=64, help="sigterm: requests in flight at the signal")
    p.add_argument("--threads", type=int, default=1, help="GENSERVE_TORCH_THREADS of the server")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)
    if min(args.clients, args.in_flight) < 1 or min(args.baseline_s, args.every_s, args.duration_s) <= 0:
        p.error("counts must be at least 1 and durations positive")
    if args.reloads < 0 or args.broken < 0:
        p.error("--reloads and --broken cannot be negative")
    return args


# ---- the model store and the server ---------------------------------------------------------------


def tiny_version(folder: Path, seed: int) -> str:
    """Write a fresh tiny PixelCNN into ``folder`` (in place); its sha256."""
    import torch

    from models.checkpoint import save_checkpoint
    from models.pixelcnn import PixelCNN, PixelCNNConfig

    torch.manual_seed(seed)
    cfg = PixelCNNConfig(in_channels=1, height=8, width=8, levels=256, hidden=8, n_blocks=1, first_kernel=3,
                         kernel=3, out_hidden=16)  # fmt: skip
    dataset = {"spec": "bench", "name": "bench", "shape": [1, 8, 8], "levels": 256, "classes": None}
    return str(save_checkpoint(PixelCNN(cfg), folder, dataset=dataset)["weights"]["sha256"])


def break_version(folder: Path) -> None:
    """Flip one byte of the weights: model.json's sha256 no longer matches them."""
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))


def make_store(args: argparse.Namespace, root: Path) -> Path:
    folder = root / MODEL
    if args.model:
        shutil.copytree(args.model, folder)
    else:
        tiny_version(folder, args.seed)
    return folder


def image_shape(folder: Path) -> tuple[int, int]:
    """(H, W) of the model's one-channel images, from its model.json."""
    shape = json.loads((folder / "model.json").read_text())["dataset"]["shape"]
    if shape[0] != 1:
        raise SystemExit(f"{folder}: the load sends one-channel images; this model takes {shape}")
    return int(shape[1]), int(shape[2])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path


def start_server(args: argparse.Namespace, store: Path, log: Path, launcher: list[str] | None = None) -> Server:
    """``genserve serve`` on a free port (``launcher``: the command instead of ``python -m service.cli``)."""
    port = free_port()
    env = {**os.environ, "GENSERVE_ADMIN_KEYS": ADMIN_KEY, "GENSERVE_TORCH_THREADS": str(args.threads),
           "GENSERVE_JSON_LOGS": "true", "GENSERVE_SHUTDOWN_TIMEOUT_S": "30"}  # fmt: skip
    launcher = launcher or [sys.executable, "-m", "service.cli"]
    cmd = [*launcher, "serve", "--port", str(port), "--model-dir", str(store)]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    wait_ready(server)
    return server


def wait_ready(server: Server, timeout_s: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"the server exited ({server.proc.returncode}); see {server.log}")
        try:
            if httpx.get(server.url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server was not ready within {timeout_s:g} s; see {server.log}")


def stop_server(server: Server) -> int:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    return int(server.proc.returncode)


# ---- the load ---------------------------------------------------------------------------------------


@dataclass
class Record:
    kind: str
    start: float
    seconds: float
    status: int  # 0: no HTTP answer (connection refused or reset, timeout)
    sha256: str = ""
    error: str = ""


@dataclass
class Load:
    """Client loops sending the mixed load until ``stop`` is set; every answer recorded."""

    url: str
    shape: tuple[int, int]
    records: list[Record] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def image(self, rng: random.Random) -> str:
        import base64
        import io

        import numpy as np
        from PIL import Image

        arr = np.random.default_rng(rng.randrange(2**32)).integers(0, 256, size=self.shape, dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    async def one(self, client: Any, rng: random.Random) -> Record:
        roll = rng.random()
        start = time.perf_counter()
        kind = "score" if roll < 0.7 else "sample" if roll < 0.9 else "stream"
        try:
            if kind == "score":
                r = await client.post("/score", json={"model": MODEL, "images": [self.image(rng) for _ in range(4)]})
                status, sha = r.status_code, r.headers.get("x-model-sha256", "")
            else:
                path = "/sample" if kind == "sample" else "/sample/stream"
                async with client.stream("POST", path, json={"model": MODEL, "n": 1, "seed": rng.randrange(1000)}) as r:
                    body = b"".join([chunk async for chunk in r.aiter_bytes()])
                    status, sha = r.status_code, r.headers.get("x-model-sha256", "")
                    if kind == "stream" and b"event: result" not in body:
                        status = 0 if status == 200 else status  # a stream cut short is a failure
            return Record(kind, start, time.perf_counter() - start, status, sha)
        except Exception as e:
            return Record(kind, start, time.perf_counter() - start, 0, error=f"{type(e).__name__}: {e}")

    async def loop(self, seed: int) -> None:
        import httpx

        rng = random.Random(seed)
        async with httpx.AsyncClient(base_url=self.url, timeout=60) as client:
            while not self.stop.is_set():
                self.records.append(await self.one(client, rng))


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def phase_summary(records: list[Record]) -> dict[str, Any]:
    failed = [r for r in records if r.status != 200]
    by_status: dict[str, int] = {}
    for r in failed:
        by_status[str(r.status)] = by_status.get(str(r.status), 0) + 1
    secs = [r.seconds for r in records]
    return {
        "requests": len(records),
        "failed": len(failed),
        "failed_by_status": by_status,
        "errors": sorted({r.error for r in failed if r.error})[:5],
        "p50_s": percentile(secs, 50),
        "p99_s": percentile(secs, 99),
        "p99_score_s": percentile([r.seconds for r in records if r.kind == "score"], 99),
    }


# ---- the campaigns ----------------------------------------------------------------------------------


async def offer(url: str, folder: Path, i: int, broken: bool, seed: int) -> dict[str, Any]:
    """Write version ``i`` in place (broken: weights failing the sha256 check) and reload it via the admin API."""
    import httpx

    await asyncio.to_thread(tiny_version, folder, seed + 1000 + i)
    if broken:
        await asyncio.to_thread(break_version, folder)
    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        r = await client.post(f"/admin/models/{MODEL}/reload", headers={"X-Admin-Key": ADMIN_KEY})
    body = r.json()
    return {"broken": broken, "status": r.status_code, "seconds": round(time.perf_counter() - start, 3),
            "result": body.get("result"), "sha256": body.get("sha256"), "detail": body.get("detail")}  # fmt: skip


async def reload_campaign(args: argparse.Namespace, server: Server, folder: Path) -> dict[str, Any]:
    load = Load(server.url, image_shape(folder))
    loops = [asyncio.create_task(load.loop(args.seed + i)) for i in range(args.clients)]
    await asyncio.sleep(args.baseline_s)
    switch = time.perf_counter()
    plan = [False] * args.reloads + [True] * args.broken
    random.Random(args.seed).shuffle(plan)
    offers = []
    for i, broken in enumerate(plan):
        await asyncio.sleep(args.every_s)
        offers.append(await offer(server.url, folder, i, broken, args.seed))
    await asyncio.sleep(args.every_s)  # the last version's drain, under load
    load.stop.set()
    await asyncio.gather(*loops)
    before = [r for r in load.records if r.start < switch]
    during = [r for r in load.records if r.start >= switch]
    known = {o["sha256"] for o in offers if o["status"] == 200} | {r.sha256 for r in before}
    return {
        "without_reloads": phase_summary(before),
        "during_reloads": phase_summary(during),
        "offers": offers,
        "versions_that_answered": len({r.sha256 for r in during if r.sha256}),
        "answered_by_an_unknown_version": sum(1 for r in during if r.sha256 and r.sha256 not in known),
    }  # fmt: skip


def proc_sample(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return {"rss_kib": rss, "fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": len(os.listdir(f"/proc/{pid}/task"))}


async def soak_campaign(args: argparse.Namespace, server: Server, folder: Path) -> dict[str, Any]:
    load = Load(server.url, image_shape(folder))
    loops = [asyncio.create_task(load.loop(args.seed + i)) for i in range(args.clients)]
    samples = []
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < args.duration_s:
        samples.append({"t_s": round(elapsed, 1), **proc_sample(server.proc.pid)})
        await asyncio.sleep(min(10.0, args.duration_s - elapsed))
    samples.append({"t_s": round(time.perf_counter() - start, 1), **proc_sample(server.proc.pid)})
    load.stop.set()
    await asyncio.gather(*loops)
    warm = [s for s in samples if s["t_s"] >= 0.2 * args.duration_s]
    first, last = warm[0], warm[-1]
    return {
        "duration_s": args.duration_s,
        "load": phase_summary(load.records),
        "status_5xx": sum(1 for r in load.records if r.status >= 500),
        "rss_growth_after_warmup": round(last["rss_kib"] / first["rss_kib"] - 1, 4),
        "fds": [first["fds"], last["fds"]],
        "threads": [first["threads"], last["threads"]],
        "samples": samples,
    }


async def sigterm_campaign(args: argparse.Namespace, server: Server, folder: Path) -> dict[str, Any]:
    """``--in-flight`` /sample requests, then SIGTERM once the server counts them all in flight."""
    import httpx

    limits = httpx.Limits(max_connections=args.in_flight + 4)
    async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:

        async def one(i: int) -> Record:
            start = time.perf_counter()
            try:
                r = await client.post("/sample", json={"model": MODEL, "n": 4, "seed": i})
                detail = "" if r.status_code == 200 else str(r.json().get("detail"))[:120]
                return Record("sample", start, time.perf_counter() - start, r.status_code, error=detail)
            except Exception as e:
                return Record("sample", start, time.perf_counter() - start, 0, error=f"{type(e).__name__}: {e}")

        tasks = [asyncio.create_task(one(i)) for i in range(args.in_flight)]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and in_flight(server) < args.in_flight:
            await asyncio.sleep(0.05)
        seen = in_flight(server)
        logger.info("%d requests in flight: SIGTERM", seen)
        signalled = time.perf_counter()
        server.proc.send_signal(signal.SIGTERM)
        records = await asyncio.gather(*tasks)
        code = await asyncio.to_thread(server.proc.wait, 60)
    return {"in_flight_at_signal": seen, "exit_code": code,
            "exit_after_s": round(time.perf_counter() - signalled, 2), **phase_summary(list(records)),
            "ok": sum(1 for r in records if r.status == 200)}  # fmt: skip


def in_flight(server: Server) -> int:
    """genserve_in_flight_requests from /metrics, less the /metrics request itself."""
    import httpx

    text = httpx.get(server.url + "/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith("genserve_in_flight_requests "):
            return int(float(line.split()[1])) - 1
    return 0


CAMPAIGNS = {"reload": reload_campaign, "soak": soak_campaign, "sigterm": sigterm_campaign}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="genserve-reliability-") as tmp:
        folder = make_store(args, Path(tmp) / "store")
        server = start_server(args, folder.parent, Path(tmp) / "server.log")
        try:
            result = asyncio.run(CAMPAIGNS[args.campaign](args, server, folder))
        finally:
            code = stop_server(server)
            log_tail = server.log.read_text(errors="replace").splitlines()[-5:]
        result = {"campaign": args.campaign, "clients": args.clients, "server_exit": code, **result,
                  "server_log_tail": log_tail}  # fmt: skip
    text = json.dumps(result, indent=2)
    print(text)  # noqa: T201 - the campaign's output
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
