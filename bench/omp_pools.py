"""Why the CPU workers share one compute thread: an idle OpenMP pool slows every other thread's ops.

torch runs CPU ops on OpenMP, and OpenMP gives each thread that runs them its own pool of helper
threads. This bench times one small convolution (the size of a PixelCNN sampling step: 16 images,
96 -> 192 channels, a 3 x 5 kernel on a 3 x 5 window) on a thread, in one process per case:

- ``alone``: nothing else has run torch ops;
- ``idle pools``: ``--others`` other threads have each run a few larger ops (so each holds its
  pool) and now wait, idle, as the other models' workers of a server do between requests;
- ``pools gone``: the same threads, ended before the timing (their pools go with them).

With ``--model FOLDER`` the timed work is that checkpoint's exact score of one image (``Scorer.compute``
for "nll", the model prepared as a worker prepares it, loaded on the timing thread): a server's answer
to a lone client. ``--others 1`` is a server that left one pool on its event loop thread (session 23).

    python bench/omp_pools.py [--others 4] [--json]
    python bench/omp_pools.py --others 1 --model checkpoints/pixelcnn-fmnist --repeats 200
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def small_conv() -> Callable[[], object]:
    """The small convolution, ready to call."""
    x, w = torch.randn(16, 96, 3, 5), torch.randn(192, 96, 3, 5)
    return lambda: torch.nn.functional.conv2d(x, w)


def one_image_score(folder: Path) -> Callable[[], object]:
    """``folder``'s exact score ("nll") of one random image (label 0 for a conditional model), ready to call."""
    from models.scoring.scorer import load_scorer

    scorer, _ = load_scorer(folder, "cpu")
    scorer.model.prepare_for_inference()
    model = scorer.model
    x = torch.randint(0, model.levels, (1, *model.shape), generator=torch.Generator().manual_seed(0))
    y = None if model.n_classes is None else torch.zeros(1, dtype=torch.long)

    def score() -> object:
        with torch.inference_mode():
            return scorer.compute(x, y, ["nll"])

    return score


def timed_conv_us(repeats: int, model: Path | None = None) -> float:
    """Mean microseconds of the small convolution (or ``model``'s one-image score), on a fresh thread."""
    out: list[float] = []

    def run() -> None:
        work = small_conv() if model is None else one_image_score(model)
        for _ in range(max(1, repeats // 10)):  # warm-up
            work()
        start = time.perf_counter()
        for _ in range(repeats):
            work()
        out.append((time.perf_counter() - start) / repeats * 1e6)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out[0]


def one_case(case: str, others: int, repeats: int, model: Path | None = None) -> float:
    """In this process: set up ``case``, then time the work (the convolution, or ``model``'s score)."""
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
        return timed_conv_us(repeats, model)
    finally:
        release.set()
        for t in threads:
            t.join()


CASES = ("alone", "idle pools", "pools gone")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--others", type=int, default=4, help="other threads (the other models' workers)")
    p.add_argument("--repeats", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=1, help="every case once per round, alternating the order")
    p.add_argument("--model", type=Path, help="time this checkpoint's one-image score instead of the convolution")
    p.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # one case, in a child process
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.case:
        print(one_case(args.case, args.others, args.repeats, args.model))  # noqa: T201 - read by the parent
        return
    work = f"{args.model.name}, one image's score" if args.model else "small convolution (16 x 96 -> 192, 3 x 5)"
    result: dict[str, Any] = {"others": args.others, "cpu_count": os.cpu_count(), "torch": torch.__version__}
    result["work"], result["rounds"] = work, {case: [] for case in CASES}
    for r in range(args.rounds):  # the order reversed every other round, so that drift falls on every case
        for case in CASES if r % 2 == 0 else tuple(reversed(CASES)):
            # each in its own process: pools, once started, last as long as their thread
            cmd = [sys.executable, __file__, "--case", case, "--others", str(args.others)]
            cmd += ["--repeats", str(args.repeats)]
            cmd += [] if args.model is None else ["--model", str(args.model.resolve())]
            result["rounds"][case].append(float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout))
    for case in CASES:
        result[case] = statistics.median(result["rounds"][case])
    result["slowdown_idle_pools"] = result["idle pools"] / result["alone"]
    if args.json:
        print(json.dumps(result))  # noqa: T201
        return
    lines = [f"{work}, mean us on a thread; {args.others} other threads; medians of {args.rounds} rounds"]
    for case in CASES:
        by_round = ", ".join(f"{v:.1f}" for v in result["rounds"][case])
        lines.append(f"  {case:12} {result[case]:8.1f}   by round: {by_round}")
    lines.append(f"  idle pools / alone: {result['slowdown_idle_pools']:.2f}x")
    print("\n".join(lines))  # noqa: T201


if __name__ == "__main__":
    main()
