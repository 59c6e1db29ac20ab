"""Where the workers' torch work runs: on CPU, one thread per worker slot, shared by every model.

torch runs CPU ops on OpenMP, which gives each thread that runs them its own pool of helper threads.
With more pool threads alive than cores (one pool per model's worker: five models on two cores
make ten), libgomp stops spinning between parallel regions: its helpers sleep after every op and
each op pays to wake them (measured by bench/omp_pools.py; docs/serving.md, "Several models on one
CPU").

So the CPU workers with the same index (one per model) hand their torch work (loading, warm-up,
each batched pass) to one :class:`ComputeThread`: one pool per slot, whatever the number of
models. Their batches take turns, first come first served, on cores they would share anyway;
batching, queues and limits stay per worker. A generation (seconds) lets the others' batches run
between its pixels, sharing the time about equally while they keep coming
(:meth:`ComputeThread.run_waiting`), so they wait for a few milliseconds, not for the whole
generation. A CUDA worker does its work on its own thread.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_STOP = object()


class _Task:
    __slots__ = ("done", "error", "fn", "result")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


MIN_SLICE_S = 0.005  # a long task runs at least this long between two turns of the waiting ones


class ComputeThread:
    """A daemon thread that runs submitted functions one at a time, in submission order.

    The thread starts on the first :meth:`run`, so building one (as a registry's startup check
    does) costs nothing. ``min_slice_s``: see :meth:`run_waiting`.
    """

    def __init__(self, name: str, *, min_slice_s: float = MIN_SLICE_S) -> None:
        self.name = name
        self.min_slice_s = min_slice_s
        self._tasks: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._slice_start = 0.0  # when the running long task last got the thread back
        self._last_turn_s = 0.0  # how long the waiting tasks took on their last turn

    @property
    def waiting(self) -> int:
        """Tasks submitted and not yet started."""
        return self._tasks.qsize()

    def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on this thread and return its result (or raise its exception) to the caller,
        who blocks meanwhile. From the thread itself, ``fn`` runs at once."""
        if threading.current_thread() is self._thread:
            return fn()
        task = _Task(fn)
        with self._lock:
            if self._closed:
                raise RuntimeError(f"compute thread {self.name} is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()
            self._tasks.put(task)
        task.done.wait()
        if task.error is not None:
            raise task.error
        result: T = task.result
        return result

    def run_waiting(self) -> None:
        """From the thread itself, between the steps of a long task (the pixels of a generation):
        give the tasks waiting now a turn, so that they wait for a slice of it, not for all of it.

        Turns share the time: the long task first runs at least as long as the waiting tasks took
        on their last turn, and at least ``min_slice_s``, so a stream of short tasks gets about
        half the thread, not all of it. Tasks submitted during a turn wait for the next one.
        """
        assert threading.current_thread() is self._thread, "run_waiting is for the compute thread itself"
        if not self.waiting or time.perf_counter() - self._slice_start < max(self.min_slice_s, self._last_turn_s):
            return
        start = time.perf_counter()
        for _ in range(self.waiting):
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                break
            if task is _STOP:
                self._tasks.put(_STOP)  # closing: the main loop ends once the long task is done
                break
            self._do(task)
        self._slice_start = time.perf_counter()
        self._last_turn_s = self._slice_start - start

    def close(self) -> None:
        """Run what was submitted, then end the thread; later :meth:`run` calls raise."""
        with self._lock:
            self._closed = True
            if self._thread is not None:
                self._tasks.put(_STOP)

    def _loop(self) -> None:
        while (task := self._tasks.get()) is not _STOP:
            self._slice_start, self._last_turn_s = time.perf_counter(), 0.0
            self._do(task)

    @staticmethod
    def _do(task: _Task) -> None:
        try:
            task.result = task.fn()
        except BaseException as e:  # handed to the caller, whatever it is
            task.error = e
        finally:
            task.done.set()
