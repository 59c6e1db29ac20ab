"""CPU time of a server and every process under it, from Linux's /proc: what a request costs the machine.

Throughput on a shared machine moves with its other work; the CPU seconds a server spends per request
move much less (another process's load does not add to them), so the benches report both. The
count covers the server's process and all its descendants alive at the end of a phase (LitServe's
workers, genserve's HTTP processes and model servers), user and system time, spinning OpenMP threads
included: what the request took from the machine.
"""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (which may hold spaces and parentheses)."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None  # gone meanwhile, or not ours to read
    return text.rpartition(")")[2].split()


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


def cpu_ms_per_request(before: float | None, after: float | None, requests: int) -> float | None:
    """Milliseconds of CPU per answered request between two :func:`tree_cpu_seconds` readings."""
    if before is None or after is None or requests <= 0:
        return None
    return 1000.0 * (after - before) / requests
