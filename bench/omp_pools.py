"""Why the CPU workers share one compute thread: an idle OpenMP pool slows every other thread's ops.

torch runs CPU ops on OpenMP, and OpenMP gives each thread that runs them its own pool of helper
threads. This bench times one small convolution (the size of a PixelCNN sampling step: 16 images,
96 -> 192 channels, a 3 x 5 kernel on a 3 x 5 window) on a thread, in one process per case:

- ``alone``: nothing else has run torch ops;
- ``idle pools``: ``--others`` other threads have each run a few larger ops (so each holds its
  pool) and now wait, idle, as the other models' workers of a server do between requests;
- ``pools gone``: the same threads, ended before the timing (their pools go with them).

    python bench/omp_pools.py [--others 4] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

import torch


def timed_conv_us(repeats: int) -> float:
    """Mean microseconds of the small convolution, on a fresh thread."""
    x, w = torch.randn(16, 96, 3, 5), torch.randn(192, 96, 3, 5)
    out: list[float] = []

    def run() -> None:
        for _ in range(repeats // 10):  # warm-up
            torch.nn.functional.conv2d(x, w)
        start = time.perf_counter()
        for _ in range(repeats):
            torch.nn.functional.conv2d(x, w)
        out.append((time.perf_counter() - start) / repeats * 1e6)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out[0]


def one_case(case: str, others: int, repeats: int) -> float:
    """In this process: set up ``case``, then time the convolution."""
    release, done = threading.Event(), threading.Semaphore(0)

    def other() -> None:
        a = torch.randn(256, 64, 28, 28)
        torch.nn.functional.conv2d(a, torch.randn(64, 64, 3, 3))  # large enough to start a pool
        done.release()
        if case == "idle pools":
            release.wait()

    threads = [threading.Thread(target=other) for _ in range(others if case != "alone" else 0)]
    for t in threads:
        t.start()
    for _ in threads:
        done.acquire()  # every other thread has run its ops
    if case == "pools gone":
        for t in threads:
            t.join()
    try:
        return timed_conv_us(repeats)
    finally:
        release.set()
        for t in threads:
            t.join()


CASES = ("alone", "idle pools", "pools gone")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--others", type=int, default=4, help="other threads (the other models' workers)")
    p.add_argument("--repeats", type=int, default=2000)
    p.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # one case, in a child process
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.case:
        print(one_case(args.case, args.others, args.repeats))  # noqa: T201 - read by the parent
        return
    result: dict[str, Any] = {"others": args.others, "cpu_count": os.cpu_count(), "torch": torch.__version__}
    for case in CASES:  # each in its own process: pools, once started, last as long as their thread
        cmd = [sys.executable, __file__, "--case", case, "--others", str(args.others), "--repeats", str(args.repeats)]
        result[case] = float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    result["slowdown_idle_pools"] = result["idle pools"] / result["alone"]
    if args.json:
        print(json.dumps(result))  # noqa: T201
        return
    lines = [f"small convolution (16 x 96 -> 192, 3 x 5), mean us on a thread; {args.others} other threads"]
    lines += [f"  {case:12} {result[case]:8.1f}" for case in CASES]
    lines.append(f"  idle pools / alone: {result['slowdown_idle_pools']:.2f}x")
    print("\n".join(lines))  # noqa: T201


if __name__ == "__main__":
    main()
