"""``genserve serve`` with several HTTP processes (``GENSERVE_HTTP_PROCESSES`` > 1): the supervisor.

One interpreter's event loop parses, decodes and answers every request of a single-process server;
where the model's pass costs little (a GPU), that loop is the bound. Here the supervisor

1. starts one model server per (model, device) (service/model_server.py), each loading and warming
   up its model once, listening on a Unix socket in a private folder, behind an HMAC key;
2. starts ``GENSERVE_HTTP_PROCESSES`` uvicorn processes sharing the port (uvicorn's own supervisor:
   it restarts one that dies and forwards signals); each builds the usual app (:func:`create_http_app`),
   whose workers batch as ever and send their batches to the model servers;
3. on SIGINT or SIGTERM lets the HTTP processes drain (GENSERVE_SHUTDOWN_TIMEOUT_S), then stops the
   model servers.

A model server that ends (a crash in a native library, the out-of-memory killer) fails the passes it
was running (503, "retry") and is started again here; the HTTP processes reconnect at their next
batch. One that cannot be started again is written down beside its socket, and its workers in every
HTTP process turn failed (/readyz 503). Metrics are summed over the HTTP processes through
prometheus_client's multiprocess mode (service/metrics.py); drift windows stay per process (each a
sample of the same traffic, as the kernel spreads connections).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import secrets
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from service import wire
from service.loading import BatchLimits
from service.model_server import ADDRESS_ENV, KEY_ENV, ServerAddress, address_for, serve
from service.settings import Settings

logger = logging.getLogger("genserve.supervisor")

START_TIMEOUT_S = 600.0  # loading and warm-up of one model on a slow machine
STOP_TIMEOUT_S = 10.0
METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's multiprocess mode (service/metrics.py)


@dataclass
class _Server:
    """One (model, device)'s server process, as the supervisor knows it."""

    name: str
    folder: Path
    device: str
    address: ServerAddress
    proc: Any = None
    control: Connection | None = None


class ModelServers:
    """Starts, watches (restarting one that ends) and stops the model servers."""

    def __init__(
        self, limits: BatchLimits, folder: Path, authkey: bytes, *, target: Callable[..., None] = serve
    ) -> None:
        self.limits, self.folder, self.authkey = limits, folder, authkey
        self.target = target  # the server's entry point (tests pass one with faults)
        self.servers: list[_Server] = []
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    def add(self, name: str, model_folder: Path, devices: list[str]) -> None:
        for i, device in enumerate(devices):
            address = address_for(self.folder, name, i, self.authkey)
            self.servers.append(_Server(name=name, folder=model_folder, device=device, address=address))

    def start(self) -> None:
        """Start every server and wait until each is ready (they load side by side); RuntimeError
        naming the first that could not load."""
        for s in self.servers:
            self._spawn(s)
        for s in self.servers:
            self._wait_ready(s)
        self._watcher = threading.Thread(target=self._watch, name="genserve-watch-servers", daemon=True)
        self._watcher.start()

    def _spawn(self, s: _Server) -> None:
        ctx = mp.get_context("spawn")  # no fork of a process that holds threads (and perhaps CUDA)
        mine, theirs = ctx.Pipe(duplex=True)
        s.proc = ctx.Process(
            target=self.target,
            args=(theirs, s.address.path, self.authkey.hex(), str(s.folder), s.device, asdict(self.limits), s.name),
            name=f"genserve-model-{s.name}-{s.device}",
            daemon=True,
        )
        s.proc.start()
        theirs.close()
        s.control = mine

    def _wait_ready(self, s: _Server) -> None:
        assert s.control is not None
        why = f"did not load in {START_TIMEOUT_S:.0f} s"
        if s.control.poll(START_TIMEOUT_S):
            try:
                header, _ = wire.recv(s.control)
            except (EOFError, OSError):
                header = {"type": "failed", "error": f"it ended while loading (exit code {s.proc.exitcode})"}
            if header.get("type") == "ready":
                logger.info("model server of '%s' on %s ready (pid %s)", s.name, s.device, header.get("pid"))
                return
            why = str(header.get("error") or header)
        self._end(s)
        raise RuntimeError(f"the model server of '{s.name}' on {s.device} could not start: {why}")

    def _watch(self) -> None:
        """Start again a server that ended, until stopping."""
        while not self._stopping.is_set():
            alive = {s.proc.sentinel: s for s in self.servers if s.proc is not None}
            for sentinel in wait(list(alive), timeout=0.5):
                s = alive[sentinel]
                if self._stopping.is_set():
                    return
                logger.error("model server of '%s' on %s ended (exit code %s); starting it again",
                             s.name, s.device, s.proc.exitcode)  # fmt: skip
                self._end(s)
                try:
                    self._spawn(s)
                    self._wait_ready(s)
                except Exception as e:
                    logger.error("%s", e)
                    s.address.failed_path.write_text(str(e))  # its clients stop waiting and fail

    def stop(self) -> None:
        """Ask every server to end after its pass; kill one that has not ended in STOP_TIMEOUT_S."""
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join(STOP_TIMEOUT_S)
        for s in self.servers:
            if s.control is not None:
                with contextlib.suppress(OSError, ValueError):
                    wire.send(s.control, {"type": "stop"})
        for s in self.servers:
            self._end(s)

    def _end(self, s: _Server) -> None:
        if s.proc is not None:
            s.proc.join(STOP_TIMEOUT_S)
            if s.proc.is_alive():
                logger.warning("model server of '%s' on %s did not stop; killing it", s.name, s.device)
                s.proc.kill()
                s.proc.join(STOP_TIMEOUT_S)
        if s.control is not None:
            with contextlib.suppress(OSError):
                s.control.close()
        s.proc, s.control = None, None


def create_http_app() -> FastAPI:
    """The app of one HTTP process (uvicorn's factory): its settings from the environment the
    supervisor set; torch on one thread (the models run in their servers, not here)."""
    import torch

    from service.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    return create_app(Settings())


def serve_http_processes(settings: Settings, entries: dict[str, Path], host: str, port: int) -> int:
    """Run the model servers of ``entries`` (name -> folder) and ``settings.http_processes`` HTTP
    processes on host:port until a signal ends them; the process's exit status."""
    import uvicorn

    from service.registry import ModelRegistry

    limits = ModelRegistry.batch_limits(settings)
    with tempfile.TemporaryDirectory(prefix="genserve-") as tmp:
        root = Path(tmp)
        os.chmod(root, 0o700)
        servers = ModelServers(limits, root, secrets.token_bytes(32))
        for name, folder in entries.items():
            servers.add(name, folder, settings.worker_devices(len(entries)))
        try:
            servers.start()
        except RuntimeError as e:
            logger.error("%s", e)
            servers.stop()
            return 1
        (root / "metrics").mkdir()
        # Read by the HTTP processes uvicorn spawns (they start from a fresh interpreter).
        os.environ.update({ADDRESS_ENV: str(root), KEY_ENV: servers.authkey.hex(), METRICS_ENV: str(root / "metrics")})
        logger.info("serving %s on http://%s:%d with %d HTTP processes (docs at /docs)", settings.model_dir, host,
                    port, settings.http_processes)  # fmt: skip
        try:
            uvicorn.run(
                "service.http_processes:create_http_app",
                factory=True,
                host=host,
                port=port,
                workers=settings.http_processes,
                log_config=None,
                access_log=False,
                timeout_graceful_shutdown=settings.shutdown_timeout_s,
            )
        finally:
            servers.stop()
    return 0
