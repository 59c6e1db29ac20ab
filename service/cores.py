"""The CPU cores that the passes running at one time split between them.

A CPU worker's pass runs on torch's threads, one per core by default. With several CPU workers
(``GENSERVE_DEVICES=cpu,cpu``, or several models whose passes run in processes of their own), two
passes that each take every core put two threads on each: OpenMP's barriers then wait for threads
that have lost their core, and a VAE's two image shares contend for one interpreter lock. One
thread per pass (``GENSERVE_TORCH_THREADS=1``) avoids that under load, but leaves a lone request's
pass on one core. So each pass claims its share when it starts: every core when no other pass is
running, ``cores // n`` (at least one) when it is the n-th. It keeps that count until it ends: a
pass that started alone runs on, and the next ones take what is left.

Claims count threads, not passes: a pass that runs inside another on the same thread (a model's
turn between a generation's pixels on a shared compute thread, service/compute.py) takes no share
of its own.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator


class CoreShare:
    """``cores`` CPU threads, shared out among the threads that are running passes."""

    def __init__(self, cores: int) -> None:
        if cores < 1:
            raise ValueError(f"cores must be at least 1, got {cores}")
        self.cores = cores
        self._lock = threading.Lock()
        self._holders: Counter[int] = Counter()  # thread id -> passes it is running (nested ones too)

    @property
    def running(self) -> int:
        """Threads running a pass now."""
        with self._lock:
            return len(self._holders)

    @contextlib.contextmanager
    def claim(self) -> Iterator[int]:
        """Around one pass: the torch threads it may run on, given the passes already running."""
        me = threading.get_ident()
        with self._lock:
            self._holders[me] += 1
            threads = max(1, self.cores // len(self._holders))
        try:
            yield threads
        finally:
            with self._lock:
                self._holders[me] -= 1
                if not self._holders[me]:
                    del self._holders[me]
