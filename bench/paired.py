"""Paired short phases for the peer bench (``peer_bench.py --pairs N``): both servers up, one frozen.

Rounds of ten seconds that restart each server spread over minutes, and this shared machine drifts
over minutes: two rounds of the same server have differed by a quarter. Here both servers start once
and stay up; every process of the one not being measured is stopped (SIGSTOP: no CPU at all, no
timers, no threads spinning) while the other is loaded. Each pair is one phase of each server back
to back (order alternating pair after pair), each phase after a short unmeasured warm-up at the same
load, so that a pair's two phases share the machine's state of those seconds. A pair gives one ratio
(genserve / LitServe); the summary is the median of the pairs' ratios with a distribution-free
confidence interval for it (order statistics of the pairs' ratios: no assumption about their spread).

    python bench/peer_bench.py --pairs 12 --seconds 4 [--models vae-fmnist]
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import statistics
from collections.abc import Callable
from typing import Any

from proc_cpu import cpu_ms_per_request, descendants, tree_cpu_seconds

Phase = dict[str, Any]  # one load phase: images_per_s, requests, errors, cpu_ms_per_request


def _signal_tree(pid: int, sig: int) -> None:
    for p in descendants(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, sig)


def freeze(pid: int) -> None:
    """Stop ``pid`` and every process under it (SIGSTOP), so that it takes no CPU while another is measured."""
    _signal_tree(pid, signal.SIGSTOP)


def thaw(pid: int) -> None:
    """Continue ``pid`` and every process under it (SIGCONT)."""
    _signal_tree(pid, signal.SIGCONT)


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float, float]:
    """(median, low, high, coverage): the sample median and the narrowest order-statistic interval
    [x_(k), x_(n+1-k)] whose coverage of the population median, 1 - 2 P(Binomial(n, 1/2) < k), is at
    least ``confidence`` (whatever the values' distribution); with too few values for that, the whole
    range and its own coverage (0.94 for 5 values, 0.98 for 10)."""
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        raise ValueError("no values")

    def coverage(k: int) -> float:
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= confidence:
        k += 1
    return statistics.median(xs), xs[k - 1], xs[n - k], coverage(k)


def machine_ticks() -> tuple[int, int] | None:
    """(idle, total) clock ticks of every CPU so far, from /proc/stat (idle counts iowait too); None without it."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + fields[4], sum(fields[:8])  # idle, iowait; user..steal (guests are inside user)


def idle_fraction(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The share of the machine's CPU time that went idle between two :func:`machine_ticks` readings."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def measured_phase(pid: int, load: Callable[[float], Phase], *, seconds: float, warm_seconds: float) -> Phase:
    """Thaw the server ``pid``, load it ``warm_seconds`` unmeasured, then ``seconds`` measured (with the CPU
    every process of it spent per answered request, and the share of the machine left idle meanwhile), and
    freeze it again."""
    thaw(pid)
    try:
        if warm_seconds > 0:
            load(warm_seconds)
        before, ticks = tree_cpu_seconds(pid), machine_ticks()
        got = load(seconds)
        got["cpu_ms_per_request"] = cpu_ms_per_request(before, tree_cpu_seconds(pid), int(got["requests"]))
        got["machine_idle"] = idle_fraction(ticks, machine_ticks())  # the client's own start-up inside
        return got
    finally:
        freeze(pid)


def run_pairs(
    pids: dict[str, int],
    loads: dict[str, Callable[[int, float], Phase]],
    *,
    clients: tuple[int, ...],
    pairs: int,
    seconds: float,
    warm_seconds: float,
) -> dict[int, list[dict[str, Phase]]]:
    """For each client count, ``pairs`` pairs of phases of the two servers named in ``pids`` (frozen on
    entry, left frozen), the first server first in even pairs and second in odd ones: {clients: [{server:
    phase}]}. ``loads[server](clients, seconds)`` loads that server and returns the phase's figures."""
    names = list(pids)
    if len(names) != 2:
        raise ValueError("pairs compare two servers")
    out: dict[int, list[dict[str, Phase]]] = {}
    for c in clients:
        out[c] = []
        for i in range(pairs):
            pair: dict[str, Phase] = {}
            for name in names if i % 2 == 0 else names[::-1]:

                def load(s: float, name: str = name, c: int = c) -> Phase:
                    return loads[name](c, s)

                pair[name] = measured_phase(pids[name], load, seconds=seconds, warm_seconds=warm_seconds)
            out[c].append(pair)
    return out


def summarise_pairs(results: dict[int, list[dict[str, Phase]]], mine: str, peer: str) -> dict[str, Any]:
    """Per client count: each server's median images/s, the median of the pairs' ratios ``mine / peer``
    with its confidence interval (:func:`median_interval`), the same for the CPU per request
    (``peer / mine``: above 1, ``mine`` spends less) where every phase has it, and the errors."""
    s: dict[str, Any] = {}
    for c, rows in results.items():
        ratios = [r[mine]["images_per_s"] / r[peer]["images_per_s"] for r in rows if r[peer]["images_per_s"]]
        entry: dict[str, Any] = {
            mine: statistics.median(r[mine]["images_per_s"] for r in rows),
            peer: statistics.median(r[peer]["images_per_s"] for r in rows),
            "errors": sum(int(r[n]["errors"]) for r in rows for n in (mine, peer)),
            "pairs": rows,
        }
        if ratios:
            med, lo, hi, cov = median_interval(ratios)
            entry |= {"ratio": med, "ratio_low": lo, "ratio_high": hi, "coverage": cov}
        for n in (mine, peer):
            idle = [float(v) for r in rows if (v := r[n].get("machine_idle")) is not None]
            entry[f"{n}_idle"] = statistics.median(idle) if idle and len(idle) == len(rows) else None
        cpu = [
            (float(m), float(p))
            for r in rows
            if (m := r[mine].get("cpu_ms_per_request")) and (p := r[peer].get("cpu_ms_per_request"))
        ]
        if cpu and len(cpu) == len(rows):  # every phase has its CPU figures
            med, lo, hi, _ = median_interval([p / m for m, p in cpu])
            entry |= {"cpu_ratio": med, "cpu_ratio_low": lo, "cpu_ratio_high": hi}
            entry[f"{mine}_cpu_ms"] = statistics.median(m for m, _ in cpu)
            entry[f"{peer}_cpu_ms"] = statistics.median(p for _, p in cpu)
        s[str(c)] = entry
    return s


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def pairs_table(
    result: dict[str, Any],
    mine: str = "genserve",
    peer: str = "litserve",
    labels: tuple[str, str] = ("genserve", "LitServe"),
) -> str:
    """The paired run as a markdown table, one row per (model, clients); ``labels`` name ``mine`` and ``peer``."""
    a, b = labels
    lines = [
        f"paired phases: {result['pairs']} pairs of {result['seconds']:g} s per row (each after "
        f"{result['warm_seconds']:g} s unmeasured), client {result['client']}; images/s medians; ratio = "
        f"{a} / {b}, the median of the pairs' ratios and its interval (coverage in brackets); CPU: "
        f"server CPU ms per answered request, ratio {b} / {a} (above 1: {a} spends less)",
        "",
        f"| model | clients | {a} | {b} | ratio | interval | {a} CPU ms | {b} CPU ms | CPU ratio "
        f"| CPU interval | machine idle, {a} / {b} | in-process batch 32 | {a} / in-process | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in result["models"]:
        for c, e in m["clients"].items():
            inproc = m.get("inprocess_32") if c == "32" else None
            lines.append(
                f"| {m['model']} | {c} | {e[mine]:.1f} | {e[peer]:.1f} | {_fmt(e.get('ratio'), '.2f')} "
                f"| {_fmt(e.get('ratio_low'), '.2f')} to {_fmt(e.get('ratio_high'), '.2f')} "
                f"({_fmt(e.get('coverage'), '.0%')}) | {_fmt(e.get(f'{mine}_cpu_ms'), '.2f')} "
                f"| {_fmt(e.get(f'{peer}_cpu_ms'), '.2f')} | {_fmt(e.get('cpu_ratio'), '.2f')} "
                f"| {_fmt(e.get('cpu_ratio_low'), '.2f')} to {_fmt(e.get('cpu_ratio_high'), '.2f')} "
                f"| {_fmt(e.get(f'{mine}_idle'), '.0%')} / {_fmt(e.get(f'{peer}_idle'), '.0%')} "
                f"| {_fmt(inproc, '.1f')} | {_fmt(inproc and e[mine] / inproc, '.2f')} | {e['errors']} |"
            )
    return "\n".join(lines)
