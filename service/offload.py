"""CPU work of a request off the event loop, but only where it is worth a thread hop.

Every ``await run_in_threadpool(...)`` hands the call to a pool thread and back: two wake-ups and
a lock hand-off, about 0.1 ms on an idle core and several times that when the cores are busy, which
is more than decoding one 28x28 PNG or building one score result costs. :func:`run_off_loop` runs
small work on the loop and large work in the pool, so a big upload still never stalls other
requests. (On a GPU, where a batch costs the device under a millisecond, the hops were the server's
bottleneck: docs/gpu.md.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ParamSpec, TypeVar

from starlette.concurrency import run_in_threadpool

P = ParamSpec("P")
R = TypeVar("R")

# Work below these sizes runs on the event loop: decoding uploads of this many bytes in all that
# need no conversion (a 28x28 PNG is under 1 KiB, and an image of another size is refused from its
# header: service/uploads.py), or building answers for this many images without heatmaps or
# returned images (a few microseconds each). bench/request_overhead.py measures the loop's cost.
INLINE_DECODE_BYTES = 64 * 1024
INLINE_RESULTS = 32


async def run_off_loop(small: bool, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """``fn(*args, **kwargs)``: here if ``small``, else in the thread pool."""
    if small:
        return fn(*args, **kwargs)
    return await run_in_threadpool(fn, *args, **kwargs)
