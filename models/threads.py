"""Spreading CPU work over threads: torch's own (OpenMP) threads, or a batch's images shared out.

torch parallelises each operation over its OpenMP threads, with a barrier at its end. For large
operations on an idle machine that is the fastest; for many small ones, or on a machine whose cores
are busy with other work, every barrier waits for a helper thread that has lost its core. Sharing
out a batch's *images* instead (:func:`split_batch`) hands work over once per share: each thread
runs the whole computation for its images on one torch thread (docs/sampling.md, "Session 16").
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

T = TypeVar("T")

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _helpers(k: int) -> ThreadPoolExecutor:
    """The shared pool of helper threads for :func:`split_batch`, of at least ``k`` threads (a
    larger one replaces it; its threads end once their work is done)."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < k:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = ThreadPoolExecutor(max_workers=k, thread_name_prefix="genserve-share"), k
        return _pool


def _forget_pool() -> None:
    """In a forked child: the parent's helper threads do not exist here; start a pool afresh."""
    global _pool, _pool_size, _pool_lock
    _pool, _pool_size, _pool_lock = None, 0, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def _on_one_thread(fn: Callable[[slice], None], rows: slice, grad: bool, inference: bool) -> None:
    """``fn(rows)`` on a helper thread, in the caller's autograd modes (they are per thread)."""
    with torch_threads(1), torch.inference_mode(inference), torch.set_grad_enabled(grad):
        fn(rows)


def split_batch(fn: Callable[[slice], None], n: int, workers: int) -> None:
    """``fn(rows)`` for up to ``workers`` contiguous slices of a batch of n images, the first on
    this thread and the others on helper threads of one torch thread each; returns when all are
    done (the first error raised, once all are). ``fn`` must only touch its own rows."""
    k = max(1, min(workers, n))
    bounds = [n * p // k for p in range(k + 1)]
    parts = [slice(bounds[p], bounds[p + 1]) for p in range(k)]
    if k == 1:
        fn(parts[0])
        return
    pool = _helpers(k - 1)
    modes = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    futures = [pool.submit(_on_one_thread, fn, rows, *modes) for rows in parts[1:]]
    try:
        fn(parts[0])
    finally:
        for f in futures:
            f.exception()  # wait for every helper, even if this thread's share failed
    for f in futures:
        f.result()


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """``torch.set_num_threads(n)`` inside the block, the previous count after it (nothing to do if
    n is None or already the count). Changing the count costs milliseconds: not per step."""
    prev = torch.get_num_threads()
    if n is None or n == prev:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def on_passing_thread(fn: Callable[[], T]) -> T:
    """``fn()`` on a new thread that ends when it returns; its result, or its exception, to the caller.

    libgomp keeps a pool of helper threads for every thread that has run a parallel region (a torch
    operation on more than about 32k elements), for as long as that thread lives; and once a process
    holds more such threads than cores, every pool's helpers stop spinning between regions and sleep
    after each, so each operation of a pass pays to wake them (docs/serving.md, "One OpenMP pool per
    process"). A server's event loop and executor threads live as long as the server: torch work on
    them (the registry's config check, which builds each model) goes through here, so that its pool
    ends with the thread.
    """
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except BaseException as e:  # re-raised in the caller's thread
            out["error"] = e

    thread = threading.Thread(target=run, name="genserve-passing", daemon=True)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["result"]
