"""How a worker's batch takes jobs from its queue (service/batching.py): the jobs that fit, and the
regather wait (``GENSERVE_BATCH_REGATHER``, docs/serving.md).

With N clients each waiting for its answer, a pass that starts as soon as the last one ends takes
only the requests that came in meanwhile, and the clients it answered return a moment later for the
pass after it: passes alternate between n and N - n requests. :func:`regather` lets a pass smaller
than the last one wait, up to ``fraction`` of the last pass's time, until it holds as many images as
the last did (or its cap). A lone client's pass holds as many as its last one from the start, so it
never waits.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any, Protocol, TypeVar


class Queued(Protocol):
    """A queued job as the gathering reads it."""

    @property
    def size(self) -> int: ...

    @property
    def task(self) -> Any: ...


J = TypeVar("J", bound=Queued)


def take(queue: deque[J], batch: list[J], size: int, key: Hashable, cap: int) -> int:
    """Move the queued jobs of batch key ``key`` that fit under ``cap`` images into ``batch``, oldest
    first (other keys wait for a later pass); returns the batch's new size in images."""
    for job in list(queue):
        if job.task.batch_key() == key and size + job.size <= cap:
            queue.remove(job)
            batch.append(job)
            size += job.size
    return size


def regather(
    cond: threading.Condition,
    queue: deque[J],
    batch: list[J],
    size: int,
    key: Hashable,
    cap: int,
    *,
    last: tuple[int, float],
    fraction: float,
    ready: Callable[[], bool],
) -> None:
    """Wait (``cond`` held) until ``batch`` holds ``last[0]`` images or its cap, for at most
    ``fraction * last[1]`` seconds, taking each matching job as it arrives (see the module docstring)."""
    want = min(cap, last[0])
    deadline = time.perf_counter() + fraction * last[1]
    while size < want and ready():
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            break
        cond.wait(remaining)  # woken by each new job
        size = take(queue, batch, size, key, cap)
