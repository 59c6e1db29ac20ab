"""The HTTP process's side of a shared model server (service/model_server.py): a worker's passes sent
over the server's socket, as service/model_process.py sends them to a process of the worker's own."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from multiprocessing.connection import Client
from pathlib import Path
from typing import Any

from service import wire
from service.jobs import Task
from service.loading import BatchLimits
from service.model_process import START_TIMEOUT_S, ModelProcess, Target
from service.model_server import ServerAddress

logger = logging.getLogger("genserve.worker")

CONNECT_POLL_S = 0.1  # while the server (re)starts, how often a client tries to connect


class SharedModel(ModelProcess):
    """A worker's passes sent to its (model, device)'s shared server, as :class:`ModelProcess` sends
    them to a process of its own; :meth:`start` connects (waiting while the supervisor starts the
    server again after a crash), :meth:`stop` disconnects."""

    def __init__(self, *, name: str, folder: Path, device: str, limits: BatchLimits, address: ServerAddress) -> None:
        super().__init__(name=name, folder=folder, device=device, limits=limits)
        self.address = address

    @property
    def alive(self) -> bool:
        return self._conn is not None and not self._conn.closed

    @property
    def pid(self) -> int | None:
        return None

    def start(self) -> None:
        """Connect and read the model's hello; RuntimeError if no server answers in START_TIMEOUT_S
        or the supervisor has written that it cannot start one."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.address.failed_path.exists():
                raise RuntimeError(f"its model server could not be started: {self.address.failed_path.read_text()}")
            try:
                conn = Client(self.address.path, family="AF_UNIX", authkey=self.address.authkey)
                break
            except (FileNotFoundError, ConnectionRefusedError) as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no model server answered at {self.address.path}") from e
                time.sleep(CONNECT_POLL_S)
        if not conn.poll(START_TIMEOUT_S):
            conn.close()
            raise RuntimeError(f"the model server at {self.address.path} did not say hello")
        header, _ = wire.recv(conn)
        self._conn = conn
        self.weights_sha256, self.pass_size = str(header["weights_sha256"]), int(header["pass_size"])

    def run(
        self,
        task_type: type[Task[Any]],
        tasks: list[Any],
        cancelled: list[Callable[[], bool]],
        *,
        alone: bool = False,
        backlog: int = 0,
        threads: int | None = None,
    ) -> list[Any]:
        """As :meth:`ModelProcess.run`, but ``threads`` is not sent: the server's passes merge the
        batches of several HTTP processes and run on its own count."""
        if self.alive and self._closed_by_server():
            self._reap()  # the server ended since our last pass: connect to its successor, losing nothing
        return super().run(task_type, tasks, cancelled, alone=alone, backlog=backlog)

    def _closed_by_server(self) -> bool:
        assert self._conn is not None
        try:
            while self._conn.poll(0):
                self._conn.recv_bytes()  # a late message of an abandoned pass: dropped
        except (EOFError, OSError):
            return True
        return False

    def stop(self, timeout: float = 0.0) -> None:
        self._reap()

    def _restart(self) -> None:
        self.restarts += 1
        logger.warning("model '%s' on %s: connecting to its model server again (%d)", self.name, self.device,
                       self.restarts)  # fmt: skip
        self._reap()
        self.start()

    def _reap(self) -> int | None:
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()
        self._conn = None
        return None


def model_process_for(
    *, name: str, folder: Path, device: str, limits: BatchLimits, target: Target | None, server: ServerAddress | None
) -> ModelProcess | None:
    """Where a worker's passes run when not on its thread: the shared server at ``server`` (several HTTP
    processes), a process of its own (``limits.model_process``), or None (its thread)."""
    if server is not None:
        return SharedModel(name=name, folder=folder, device=device, limits=limits, address=server)
    if limits.model_process:
        return ModelProcess(name=name, folder=folder, device=device, limits=limits, target=target)
    return None
