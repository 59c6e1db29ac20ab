"""One model on one device, shared by every HTTP process (``GENSERVE_HTTP_PROCESSES`` > 1).

With several HTTP processes (service/http_processes.py) each keeps its own workers, which queue,
batch, cancel, limit and count as ever (service/batching.py), and sends each batch down a Unix
socket to the model server of its (model, device): one process that holds the model once and runs
the passes of every HTTP process. Batches that wait together are merged into one pass (same task
type and batch key, up to the pass's cap), so the requests of several HTTP processes still share
passes as those of one process do; a pass waits a moment for the processes the last pass answered
that still had images queued (:meth:`ModelServer._take`).

::

    HTTP process 1: event loop -> Worker -> batch --\\
    HTTP process 2: event loop -> Worker -> batch ---+--(socket)--> model server: merge, Task.run
    ...                                         <-- rows, result or error, to each batch's sender --

Messages are service/wire.py's, as with a worker's own model process (service/model_process.py):
nothing is unpickled, and a client must pass multiprocessing's HMAC challenge (a key only the
supervisor and its HTTP processes know) before it is heard. The guarantees hold across processes: a
merged pass that raises runs again one batch at a time (then each HTTP worker runs its own tasks one
at a time, never merged: ``alone``), so only a culprit fails; a caller who leaves is told here and
its generation stops after the current row; a client that goes away cancels what it sent.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, Listener
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from service import wire
from service.jobs import PassLimits, Runtime, Task
from service.loading import BatchLimits, load_for_serving

logger = logging.getLogger("genserve.model_server")

ADDRESS_ENV = "GENSERVE_MODEL_SERVER_DIR"  # set by the supervisor for its HTTP processes
KEY_ENV = "GENSERVE_MODEL_SERVER_KEY"  # the HMAC key, hex; never logged
# A pass waits for the clients the last pass answered, whose next batches are a moment away, up to this
# fraction of the last pass's time and never longer than MERGE_WAIT_MAX_S (see ModelServer._take).
MERGE_WAIT_FRACTION = 0.5
MERGE_WAIT_MAX_S = 0.05


@dataclass(frozen=True)
class ServerAddress:
    """Where a (model, device)'s server listens, and the key its clients prove they hold."""

    path: str
    authkey: bytes

    @property
    def failed_path(self) -> Path:
        """Written by the supervisor when the server cannot be started again: the reason, for clients."""
        return Path(self.path + ".failed")


def address_for(folder: Path, name: str, device_index: int, authkey: bytes) -> ServerAddress:
    """The socket of model ``name``'s server for device ``device_index`` in ``folder`` (short names:
    a Unix socket's path is limited to about 100 bytes)."""
    tag = hashlib.sha256(name.encode()).hexdigest()[:12]
    return ServerAddress(path=str(folder / f"{tag}-{device_index}.sock"), authkey=authkey)


def address_from_environment(name: str, device_index: int) -> ServerAddress | None:
    """In an HTTP process started by the supervisor: the server of (``name``, device); else None."""
    folder, key = os.environ.get(ADDRESS_ENV), os.environ.get(KEY_ENV)
    if not folder or not key:
        return None
    return address_for(Path(folder), name, device_index, bytes.fromhex(key))


class _Client:
    """One HTTP process's connection; replies to it from the pass thread, reads on its own thread."""

    def __init__(self, conn: Connection, number: int) -> None:
        self.conn, self.number = conn, number
        self.gone = False
        self._lock = threading.Lock()

    def send(self, header: dict[str, Any], tensors: dict[str, Tensor] | None = None) -> None:
        if self.gone:
            return
        try:
            with self._lock:
                wire.send(self.conn, header, tensors)
        except (OSError, ValueError):  # it has gone: what it asked for is dropped
            self.gone = True


@dataclass(eq=False)
class _Pass:
    """A batch of tasks one HTTP process sent (its id is that process's)."""

    client: _Client
    id: int
    task_type: type[Task[Any]]
    tasks: list[Any]
    alone: bool  # a retry of one task after a failed pass: never merged
    backlog: int  # images its sender still had queued: it sends again right after this pass's result
    key: Hashable = field(init=False)
    images: int = field(init=False)

    def __post_init__(self) -> None:
        self.key = (self.task_type.op, self.tasks[0].batch_key())
        self.images = sum(t.size for t in self.tasks)


class ModelServer:
    """The passes of every client, merged where they can be, run one at a time on this thread."""

    def __init__(self, runtime: Runtime, hello: dict[str, Any]) -> None:
        self.runtime, self.hello = runtime, hello
        self.limits = PassLimits(max_batch_size=runtime.max_batch_size, max_sample_batch=runtime.max_sample_batch)
        self.merged = 0  # passes that held the batches of more than one client (for the log and tests)
        self._queue: deque[_Pass] = deque()
        self._cond = threading.Condition()
        self._cancelled: set[tuple[int, int, int]] = set()  # (client, pass id, task index)
        self._stopping = False
        self._answered: dict[int, _Client] = {}  # the clients the last pass answered with a backlog, by number
        self._last_pass_s = 0.0

    # ---- clients ------------------------------------------------------------------------------

    def accept(self, listener: Listener) -> None:
        """Accept clients until the listener closes; each gets the model's hello, then a reader."""
        number = 0
        while True:
            try:
                conn = listener.accept()
            except (OSError, EOFError, AuthenticationError):
                if self._stopping:
                    return
                continue  # a client that failed the key's challenge, or left during it
            number += 1
            client = _Client(conn, number)
            client.send(self.hello)
            threading.Thread(target=self.read, args=(client,), name=f"genserve-client-{number}", daemon=True).start()

    def read(self, client: _Client) -> None:
        """One client's messages: batches to the queue, cancellations at once; its end cancels its work."""
        try:
            while True:
                header, tensors = wire.recv(client.conn)
                if header["type"] == "run":
                    self._queue_pass(client, header, tensors)
                elif header["type"] == "cancel":
                    with self._cond:
                        self._cancelled.add((client.number, int(header["id"]), int(header["index"])))
        except (EOFError, OSError, wire.WireError, KeyError, ValueError):
            pass
        finally:
            client.gone = True
            with self._cond:
                for p in [p for p in self._queue if p.client is client]:
                    self._queue.remove(p)
            with contextlib.suppress(OSError):
                client.conn.close()

    def _queue_pass(self, client: _Client, header: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        try:
            task_type, tasks = wire.tasks_from(header, tensors)
        except (wire.WireError, KeyError, TypeError, ValueError) as e:
            client.send(_error_reply(int(header.get("id", 0)), e))
            return
        with self._cond:
            sent = _Pass(
                client, int(header["id"]), task_type, tasks, bool(header.get("alone")), int(header.get("backlog", 0))
            )
            self._queue.append(sent)
            self._cond.notify()

    def stop(self) -> None:
        """End :meth:`run` after the pass it is running."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    # ---- passes -------------------------------------------------------------------------------

    def run(self) -> None:
        """Run passes until stopped."""
        while (group := self._take()) is not None:
            self._execute(group)

    def _take(self) -> list[_Pass] | None:
        """The oldest batch and every queued batch that can share its pass (same type and key, up to
        the cap of images); None once stopped.

        Each HTTP process has one batch in flight per worker, so without a wait the passes would
        alternate between processes, each holding one process's share of the clients: the clients
        the last pass answered that had more images queued (a batch's ``backlog``) send their next
        batches a moment after their results, and the pass waits for them (up to MERGE_WAIT_FRACTION
        of the last pass's time, at most MERGE_WAIT_MAX_S; a client that sends something else, or
        has gone, is no longer waited for)."""
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            first = self._queue.popleft()
            group, images = [first], first.images
            if first.alone:
                return group
            cap = first.tasks[0].batch_cap(self.limits)
            images = self._merge(group, images, cap)
            deadline = time.perf_counter() + min(MERGE_WAIT_FRACTION * self._last_pass_s, MERGE_WAIT_MAX_S)
            while images < cap and not self._stopping and (remaining := deadline - time.perf_counter()) > 0:
                sent = {p.client.number for p in (*group, *self._queue)}
                if not [c for n, c in self._answered.items() if n not in sent and not c.gone]:
                    break
                self._cond.wait(remaining)
                images = self._merge(group, images, cap)
            return group

    def _merge(self, group: list[_Pass], images: int, cap: int) -> int:
        """Move the queued batches that can share ``group``'s pass into it; its images after."""
        for p in list(self._queue):
            if not p.alone and p.key == group[0].key and images + p.images <= cap:
                self._queue.remove(p)
                group.append(p)
                images += p.images
        return images

    def _execute(self, group: list[_Pass]) -> None:
        """One pass over ``group``'s tasks; each batch's results (or the error) go to its sender."""
        task_type = group[0].task_type
        tasks = [t for p in group for t in p.tasks]
        gone = [self._gone(p, i) for p in group for i in range(len(p.tasks))]
        for p in group:
            for i, task in enumerate(p.tasks):
                if hasattr(task, "on_row"):  # a flag: report rows back where the caller wants them
                    task.on_row = _row_reporter(p.client, p.id, i) if task.on_row else None
        start = time.perf_counter()
        try:
            results = task_type.run(self.runtime, tasks, gone)
        except Exception as e:
            if len(group) > 1 and task_type.isolate_failures:
                # Another process's batch may be the culprit: run each alone, so only its sender hears of it.
                for p in group:
                    self._execute([p])
                return
            for p in group:
                p.client.send(_error_reply(p.id, e))
            return
        finally:
            self._forget(group)
        if len(group) > 1:
            self.merged += 1
        self._last_pass_s = time.perf_counter() - start
        self._answered = {p.client.number: p.client for p in group if p.backlog > 0}
        start = 0
        for p in group:
            mine = results[start : start + len(p.tasks)]
            start += len(p.tasks)
            reply, out = wire.results_message(mine)
            p.client.send({"type": "result", "id": p.id, "batches": len(group), **reply}, out)

    def _gone(self, p: _Pass, index: int) -> Callable[[], bool]:
        key = (p.client.number, p.id, index)
        return lambda: p.client.gone or key in self._cancelled

    def _forget(self, group: list[_Pass]) -> None:
        with self._cond:
            for p in group:
                for i in range(len(p.tasks)):
                    self._cancelled.discard((p.client.number, p.id, i))


def _error_reply(pass_id: int, e: BaseException) -> dict[str, Any]:
    kind = "error"
    if isinstance(e, torch.cuda.OutOfMemoryError):
        kind = "oom"
        torch.cuda.empty_cache()
    return {"type": "error", "id": pass_id, "kind": kind, "message": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc()}  # fmt: skip


def _row_reporter(client: _Client, pass_id: int, index: int) -> Callable[[int, Tensor], None]:
    def on_row(rows: int, images: Tensor) -> None:
        client.send({"type": "row", "id": pass_id, "index": index, "rows": rows}, {"images": images})

    return on_row


# ---- the server process -----------------------------------------------------------------------


def serve(control: Connection, path: str, authkey_hex: str, folder: str, device: str, limits: dict[str, Any],
          name: str) -> None:  # fmt: skip
    """The model server's process: load the model, listen on ``path``, tell the supervisor (on
    ``control``) it is ready or why not, then run passes until told to stop or the supervisor has gone."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Ctrl-C and systemd's stop signal the whole process group: the HTTP processes drain their
    # requests first, then the supervisor stops this one (or its end closes ``control``).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        loaded = load_for_serving(Path(folder), device, BatchLimits(**limits), name=name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a socket left by a crashed predecessor
        listener = Listener(path, family="AF_UNIX", authkey=bytes.fromhex(authkey_hex))
        os.chmod(path, 0o600)
    except Exception as e:
        with contextlib.suppress(OSError):
            wire.send(control, {"type": "failed", "error": f"{type(e).__name__}: {e}"})
        return
    hello = {"type": "ready", "weights_sha256": loaded.scorer.weights_sha256, "pass_size": loaded.pass_size}
    runtime = Runtime(
        scorer=loaded.scorer, device=device, max_batch_size=loaded.pass_size,
        max_sample_batch=int(limits["max_sample_batch"]),
    )  # fmt: skip
    server = ModelServer(runtime, hello)
    threading.Thread(target=server.accept, args=(listener,), name="genserve-accept", daemon=True).start()
    threading.Thread(target=_until_stopped, args=(control, server), name="genserve-control", daemon=True).start()
    wire.send(control, {**hello, "pid": os.getpid()})
    try:
        server.run()
    finally:
        logger.info("model server of '%s' on %s stopping (%d merged passes)", name, device, server.merged)
        with contextlib.suppress(OSError):
            listener.close()
            os.unlink(path)


def _until_stopped(control: Connection, server: ModelServer) -> None:
    with contextlib.suppress(EOFError, OSError, wire.WireError):
        while wire.recv(control)[0].get("type") != "stop":
            pass
    server.stop()
