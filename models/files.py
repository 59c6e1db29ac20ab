"""Atomic file writes: a reader sees the old file or the new one, never a half-written one.

Every file a tool writes into a checkpoint folder (``model.json``, the weights, caches) goes through
:func:`atomic_write`: the new content is written to a temporary file in the same folder, flushed
to the disk (``fsync``), then renamed over the target (``os.replace``, atomic on POSIX), and the
folder is synced so the rename survives a crash. If anything fails on the way (a full disk, a quota,
an I/O error) the temporary file is removed and the target is left exactly as it was; a full disk
is reported as :class:`DiskFullError`, whose message names the file and says so.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable
from pathlib import Path

FULL = (errno.ENOSPC, errno.EDQUOT)  # no space left on the device; disk quota exceeded


class DiskFullError(OSError):
    """A write ran out of space; the file it was replacing is unchanged."""


def temp_path(path: Path) -> Path:
    """The temporary file beside ``path`` (same folder, so the rename never crosses a filesystem);
    the process id keeps two writers of one file apart."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """Replace ``path`` by what ``write(tmp)`` writes to the temporary path ``tmp``, atomically.

    ``write`` may be any writer that takes a path (``Path.write_bytes``, safetensors' ``save_file``,
    ``np.savez``). Raises :class:`DiskFullError` on ENOSPC/EDQUOT and re-raises other errors; in
    every failure the temporary file is gone and ``path`` holds its previous content (or is absent).
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # a delayed-allocation filesystem may only report a full disk here
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(e, OSError) and e.errno in FULL:
            raise DiskFullError(
                e.errno, f"no space left on the device writing {path} ({e.strerror}); {path.name} is unchanged"
            ) from e
        raise
    _sync_folder(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """:func:`atomic_write` of ``data``."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def _sync_folder(folder: Path) -> None:
    """fsync a folder so a rename in it is on the disk (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
