"""A request's task waiting in a worker's queue (service/batching.py), and how its caller is answered.

The event loop queues a :class:`Job` and awaits its future; the worker's thread answers it with
:func:`settle`, which hands the result (or the error) back to the loop, unless the caller has gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from service.jobs import Task


@dataclass(eq=False)
class Job:
    """One request's task (service/jobs.py) in the queue, with the future its caller awaits."""

    task: Task[Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: bool = False

    @property
    def size(self) -> int:
        return self.task.size

    def is_cancelled(self) -> bool:
        return self.cancelled


def settle(job: Job, *, result: Any = None, error: BaseException | None = None) -> None:
    """Resolve a job's future from any thread, unless its caller has already gone."""

    def apply() -> None:
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

    with contextlib.suppress(RuntimeError):  # the loop has closed
        job.loop.call_soon_threadsafe(apply)
