"""CPU time of a server and every process under it, from Linux's /proc: what a request costs the machine.

Throughput on a shared machine moves with its other work; the CPU seconds a server spends per request
move much less (another process's load does not add to them), so the benches report both. The
count covers the server's process and all its descendants alive at the end of a phase (LitServe's
workers, genserve's HTTP processes and model servers), user and system time, spinning OpenMP threads
included: what the request took from the machine. :func:`thread_cpu_seconds` and
:func:`busiest_threads` split it by thread (``peer_bench.py --threads``): where a server spends it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

PROC = Path("/proc")


def _stat_fields_of(path: Path) -> list[str] | None:
    """A /proc stat file's fields after the command name (which may hold spaces and parentheses)."""
    try:
        text = path.read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None  # gone meanwhile, or not ours to read
    return text.rpartition(")")[2].split()


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name; None if the process is gone."""
    return _stat_fields_of(PROC / str(pid) / "stat")


def descendants(pid: int) -> list[int]:
    """``pid`` and every process under it, from one scan of /proc."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))  # fields[1]: the parent's pid
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def tree_cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds of ``pid`` and its descendants so far; None without Linux's /proc."""
    if not (PROC / "self" / "stat").exists():
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in descendants(pid):
        fields = _stat_fields(p)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # utime, stime (stat fields 14 and 15), in clock ticks
    return total / ticks


def thread_cpu_seconds(pid: int) -> dict[str, float] | None:
    """User plus system CPU seconds so far of every thread of ``pid`` and its descendants, keyed
    ``"PID/TID"``; None without Linux's /proc."""
    if not (PROC / "self" / "task").is_dir():
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for p in descendants(pid):
        try:
            tids = [t.name for t in (PROC / str(p) / "task").iterdir()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # gone meanwhile
        for tid in tids:
            fields = _stat_fields_of(PROC / str(p) / "task" / tid / "stat")
            if fields is not None:
                out[f"{p}/{tid}"] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def busiest_threads(
    before: dict[str, float] | None, after: dict[str, float] | None, requests: int, *, root: int, top: int
) -> list[dict[str, Any]] | None:
    """The ``top`` threads that spent the most CPU between two :func:`thread_cpu_seconds` readings,
    busiest first: each its milliseconds per answered request and where it ran, ``"server"`` (the
    process ``root`` itself) or ``"child"`` (a process under it: LitServe's workers, genserve's model
    servers). None where /proc could not tell or nothing was answered."""
    if before is None or after is None or requests <= 0:
        return None
    spent = sorted(((after[k] - before.get(k, 0.0), k) for k in after), reverse=True)[:top]
    return [
        {"ms_per_request": 1000.0 * s / requests, "where": "server" if k.split("/")[0] == str(root) else "child"}
        for s, k in spent
    ]


def cpu_ms_per_request(before: float | None, after: float | None, requests: int) -> float | None:
    """Milliseconds of CPU per answered request between two :func:`tree_cpu_seconds` readings."""
    if before is None or after is None or requests <= 0:
        return None
    return 1000.0 * (after - before) / requests
