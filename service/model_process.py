"""A worker's model in a process of its own (``GENSERVE_MODEL_PROCESS=true``).

By default a worker's passes run on a thread of the HTTP process, so the model's Python glue (a
PixelRNN's 28 row steps, a GPU's kernel launches) takes the interpreter lock in turns with the
event loop that parses, decodes and answers requests. With a model process each side has its own
interpreter: the worker (service/batching.py) still queues, batches, cancels and counts in the HTTP
process, and sends each batch's tasks here; the model process only runs passes.

::

    HTTP process                                      model process (one per worker)
    event loop -> Worker queue -> batch --(pipe)--> Task.run on the loaded scorer
                                <-- rows (sampling progress), result or error --

Messages cross a pipe in service/wire.py's format (JSON headers and raw tensor bytes; nothing is
unpickled). The guarantees of a thread worker hold: a batch of tasks runs as one pass; a failed
pass raises in the worker, which runs each task again alone (only the culprit fails); a caller who
leaves is told to the model process, which drops a queued task's generation after its current row;
a pass that runs out of device memory is a 503. New here: **a crash of the model process** (a
segfault in a native library, the kernel's out-of-memory killer) fails only the pass it was running,
with a 503 saying so; the next pass starts a fresh process (loaded and warmed up again), and a
process that cannot start leaves the worker failed. Shutdown stops the process after its pass; it
also ends by itself when the HTTP process is gone (its pipe closes).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import queue
import signal
import threading
import traceback
from collections.abc import Callable
from dataclasses import asdict
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from models.threads import torch_threads
from service import wire
from service.errors import Unavailable
from service.jobs import Runtime, Task
from service.loading import BatchLimits, load_for_serving

logger = logging.getLogger("genserve.worker")

POLL_S = 0.01  # while a pass runs, how often the worker looks for callers who left
START_TIMEOUT_S = 600.0  # loading, warm-up and a batch sweep on a slow machine
STOP_TIMEOUT_S = 10.0


class ModelProcessError(RuntimeError):
    """A pass that raised in the model process (its message "Type: message"; the remote traceback kept)."""

    def __init__(self, message: str, *, remote_traceback: str = "") -> None:
        super().__init__(message)
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        where = f"\nin the model process:\n{self.remote_traceback}" if self.remote_traceback else ""
        return super().__str__() + where


class ModelProcessDied(Unavailable):
    """The model process ended during a pass (a crash, or killed): a 503, the pass is lost."""


Target = Callable[[Connection, str, str, dict[str, Any], str], None]


class ModelProcess:
    """The HTTP-process side of one worker's model process. Used from the worker's thread only."""

    def __init__(
        self, *, name: str, folder: Path, device: str, limits: BatchLimits, target: Target | None = None
    ) -> None:
        self.name, self.folder, self.device, self.limits = name, folder, device, limits
        self.target = target or serve
        self.weights_sha256 = ""
        self.pass_size = limits.max_batch_size
        self.restarts = 0
        self.broken = ""  # why the process could not be started again, once that has happened
        self._proc: Any = None
        self._conn: Connection | None = None
        self._next_id = 0
        self.last_batches = 0  # batches that shared the last pass (more than 1: a shared server merged them)

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> None:
        """Start the process and wait until its model is loaded and warmed up; raise if it cannot."""
        ctx = mp.get_context("spawn")  # no fork of a process that holds threads (and perhaps CUDA)
        mine, theirs = ctx.Pipe(duplex=True)
        proc = ctx.Process(
            target=self.target,
            args=(theirs, str(self.folder), self.device, asdict(self.limits), self.name),
            name=f"genserve-model-{self.name}-{self.device}",
            daemon=True,
        )
        proc.start()
        theirs.close()
        self._proc, self._conn = proc, mine
        if not mine.poll(START_TIMEOUT_S):
            self.stop()
            raise RuntimeError(f"the model process did not load '{self.name}' in {START_TIMEOUT_S:.0f} s")
        try:
            header, _ = wire.recv(mine)
        except EOFError:
            code = self._reap()
            raise RuntimeError(f"the model process ended while loading (exit code {code})") from None
        if header.get("type") != "ready":
            self.stop()
            raise RuntimeError(header.get("error") or f"unexpected message from the model process: {header}")
        self.weights_sha256 = str(header["weights_sha256"])
        self.pass_size = int(header["pass_size"])

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
        """One pass of ``tasks`` in the model process (started again first if it has ended): one
        result per task, in order. Rows of a generation reach each task's ``on_row`` on this thread.
        ``alone``: a retry after a failed pass, which a shared model server must not merge with
        other processes' batches; ``backlog``: images still queued behind this batch, for which a shared
        server's next pass waits a moment (service/model_server.py); ``threads``: the CPU threads
        this pass runs on (service/cores.py; None: the process's own count)."""
        self._ensure_alive()
        assert self._conn is not None
        self._next_id += 1
        pass_id = self._next_id
        header, tensors = wire.tasks_message(tasks)
        told: set[int] = set()
        try:
            head = {"type": "run", "id": pass_id, "alone": alone, "backlog": backlog, "threads": threads, **header}
            wire.send(self._conn, head, tensors)
            while True:
                if self._conn.poll(POLL_S):
                    reply, got = wire.recv(self._conn)
                    if reply.get("id") != pass_id:
                        continue  # a late message of an abandoned pass
                    if reply["type"] == "row":
                        on_row = tasks[reply["index"]].on_row
                        if on_row is not None:
                            on_row(int(reply["rows"]), got["images"])
                    elif reply["type"] == "result":
                        self.last_batches = int(reply.get("batches", 1))
                        return wire.results_from(reply, got)
                    elif reply.get("kind") == "oom":  # the worker answers it as it would its own: a 503
                        raise torch.cuda.OutOfMemoryError(reply["message"])
                    else:
                        raise ModelProcessError(reply["message"], remote_traceback=reply.get("traceback", ""))
                for i, gone in enumerate(cancelled):
                    if i not in told and gone():
                        told.add(i)
                        wire.send(self._conn, {"type": "cancel", "id": pass_id, "index": i})
                if not self.alive and not self._conn.poll(0):  # gone, with nothing left to read
                    raise EOFError
        except (EOFError, BrokenPipeError, ConnectionResetError):
            code = self._reap()
            how = "" if code is None else f" (model process exit code {code})"
            raise ModelProcessDied(
                f"model '{self.name}' stopped on {self.device} during this request{how}; the next request "
                "starts it again: retry"
            ) from None

    def _ensure_alive(self) -> None:
        """Start the process again if it has ended; a 503 (and ``broken`` set) if it cannot be."""
        if self.alive:
            return
        try:
            self._restart()
        except Exception as e:
            self.broken = f"{type(e).__name__}: {e}"
            raise ModelProcessDied(
                f"model '{self.name}' on {self.device} could not be started again ({self.broken})"
            ) from e

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Ask the process to end after its pass; kill it if it has not ended within ``timeout`` (it
        ignores SIGTERM, which is meant for the HTTP process)."""
        if self._conn is not None:
            with contextlib.suppress(OSError, ValueError):
                wire.send(self._conn, {"type": "stop"})
        if self._proc is not None:
            self._proc.join(timeout)
            if self._proc.is_alive():
                logger.warning("model process of '%s' on %s did not stop in %.0f s; killing it",
                               self.name, self.device, timeout)  # fmt: skip
                self._proc.kill()
                self._proc.join(timeout)
        self._reap()

    def _restart(self) -> None:
        self.restarts += 1
        logger.warning("model '%s' on %s: starting its model process again (restart %d)",
                       self.name, self.device, self.restarts)  # fmt: skip
        self._reap()
        self.start()

    def _reap(self) -> int | None:
        code = None
        if self._proc is not None:
            self._proc.join(0.5)
            code = self._proc.exitcode
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()
        self._proc, self._conn = None, None
        return code


# ---- the model process ----------------------------------------------------------------------


def serve(conn: Connection, folder: str, device: str, limits: dict[str, Any], name: str) -> None:
    """The model process: load the model, say ready (or why not), then run passes until told to
    stop or until the HTTP process has gone."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Ctrl-C (and systemd's stop) signal the whole process group: the HTTP process drains its requests,
    # then stops this one; and once the HTTP process has gone, the pipe's end stops it too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        loaded = load_for_serving(Path(folder), device, BatchLimits(**limits), name=name)
    except Exception as e:
        with contextlib.suppress(OSError):
            wire.send(conn, {"type": "failed", "error": f"{type(e).__name__}: {e}"})
        return
    wire.send(conn, {"type": "ready", "weights_sha256": loaded.scorer.weights_sha256, "pass_size": loaded.pass_size})
    runtime = Runtime(
        scorer=loaded.scorer, device=device, max_batch_size=loaded.pass_size,
        max_sample_batch=int(limits["max_sample_batch"]),
    )  # fmt: skip
    passes: queue.SimpleQueue[tuple[dict[str, Any], dict[str, Tensor]] | None] = queue.SimpleQueue()
    cancelled: set[tuple[int, int]] = set()
    threading.Thread(target=_read, args=(conn, passes, cancelled), name="genserve-model-reader", daemon=True).start()
    while (item := passes.get()) is not None:
        _run_pass(conn, runtime, *item, cancelled)


def _read(conn: Connection, passes: queue.SimpleQueue[Any], cancelled: set[tuple[int, int]]) -> None:
    """The model process's reader: passes to the queue, cancellations to the set at once."""
    try:
        while True:
            header, tensors = wire.recv(conn)
            if header["type"] == "run":
                passes.put((header, tensors))
            elif header["type"] == "cancel":
                cancelled.add((int(header["id"]), int(header["index"])))
            elif header["type"] == "stop":
                break
    except (EOFError, OSError):
        pass  # the HTTP process has gone
    finally:
        passes.put(None)


def _run_pass(
    conn: Connection,
    runtime: Runtime,
    header: dict[str, Any],
    tensors: dict[str, Tensor],
    cancelled: set[tuple[int, int]],
) -> None:
    pass_id = int(header["id"])
    try:
        task_type, tasks = wire.tasks_from(header, tensors)
        for i, task in enumerate(tasks):
            if hasattr(task, "on_row"):  # a flag: report rows back where the caller wants them
                task.on_row = _row_reporter(conn, pass_id, i) if task.on_row else None
        gone = [_gone(cancelled, pass_id, i) for i in range(len(tasks))]
        with torch_threads(header.get("threads")):  # this pass's share of the cores (service/cores.py)
            results = task_type.run(runtime, tasks, gone)
        reply, out = wire.results_message(results)
        wire.send(conn, {"type": "result", "id": pass_id, **reply}, out)
    except Exception as e:
        kind = "error"
        if isinstance(e, torch.cuda.OutOfMemoryError):
            kind = "oom"
            torch.cuda.empty_cache()
        message = f"{type(e).__name__}: {e}"
        wire.send(conn, {"type": "error", "id": pass_id, "kind": kind, "message": message,
                         "traceback": traceback.format_exc()})  # fmt: skip
    finally:  # forget this pass's cancellations (and any that came after an earlier pass ended)
        for key in [k for k in list(cancelled) if k[0] <= pass_id]:
            cancelled.discard(key)


def _gone(cancelled: set[tuple[int, int]], pass_id: int, index: int) -> Callable[[], bool]:
    return lambda: (pass_id, index) in cancelled


def _row_reporter(conn: Connection, pass_id: int, index: int) -> Callable[[int, Tensor], None]:
    def on_row(rows: int, images: Tensor) -> None:
        wire.send(conn, {"type": "row", "id": pass_id, "index": index, "rows": rows}, {"images": images})

    return on_row
