"""The C allocator of a serving process: keep freed memory for the next pass (glibc only).

glibc's malloc hands a block of 128 KiB or more back to the kernel when it is freed (``mmap``, and
the heap's top trimmed beyond 128 KiB), raising that threshold only as it sees larger blocks freed.
A pass of a VAE over 16 images frees and allocates activations of megabytes at every layer, so each
pass faulted its memory in again, page by page, zeroed by the kernel (docs/serving.md, "Freed memory
kept for the next pass"). :func:`keep_freed_memory` sets
fixed thresholds instead (``mallopt``), so blocks up to :data:`MMAP_THRESHOLD` come from malloc's own
heaps and freed memory stays there for the next pass: a process holds the peak of its passes, which
batching limits (``GENSERVE_MAX_BATCH_SIZE``), instead of returning it after each. The same
thresholds as glibc's ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...:glibc.malloc.trim_threshold=...``,
set from inside the process so that ``genserve serve`` needs no environment of its own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger("genserve.allocator")

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 * 2**20  # bytes: larger blocks are still mapped, and unmapped when freed
TRIM_THRESHOLD = 256 * 2**20  # bytes of free memory at the heap's top kept before trimming


def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc (the one with ``mallopt`` and these parameters); else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (musl does not)
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Fix malloc's mmap and trim thresholds (:data:`MMAP_THRESHOLD`, :data:`TRIM_THRESHOLD`) for
    this process. Returns whether both were set (False off glibc, where nothing changes)."""
    libc = _glibc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not ok:
        logger.warning("could not set malloc's thresholds; freed memory goes back to the kernel after each pass")
    return ok
