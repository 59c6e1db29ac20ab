"""models/threads.py's ``on_passing_thread``: torch work that must not leave an OpenMP pool behind.

libgomp gives every thread that runs a parallel region a pool of helper threads for the rest of its
life; with more of them than cores, every pool's helpers stop spinning between regions (docs/serving.md,
"One OpenMP pool per process"). The pool tests run in a fresh interpreter, whose threads they count.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from models.threads import on_passing_thread

ROOT = Path(__file__).resolve().parents[2]

# Prints how many threads that are not Python's (OpenMP's helpers among them) the process gained from
# MODE's torch work, once any pool freed with its thread has had time to go (its helpers exit a moment
# after the thread that owned them).
CHILD = textwrap.dedent(
    """
    import os, sys, threading, time
    from pathlib import Path
    import torch
    from models.threads import on_passing_thread

    def native() -> int:
        python = {t.native_id for t in threading.enumerate()}
        return sum(int(t) not in python for t in os.listdir("/proc/self/task"))

    def work() -> float:
        return float((torch.ones(1 << 20) + 1).sum())  # far above torch's grain: a parallel region

    def skeleton() -> None:
        from models.checkpoint import read_metadata
        from service.entries import skeleton_model
        folder = Path("checkpoints/pixelcnn-fmnist")
        skeleton_model(folder, read_metadata(folder))

    def build_here() -> None:
        from models.checkpoint import build_model, read_metadata
        meta = read_metadata(Path("checkpoints/pixelcnn-fmnist"))
        with torch.device("meta"):
            build_model(meta["architecture"], meta["config"])

    mode = sys.argv[1]
    before = native()
    release = threading.Event()
    if mode == "passing":
        on_passing_thread(work)
    elif mode == "long-lived":  # a thread that stays, as an event loop or an executor's thread does
        ran = threading.Event()
        threading.Thread(target=lambda: (work(), ran.set(), release.wait()), daemon=True).start()
        ran.wait()
    elif mode == "skeleton":
        skeleton()
    elif mode == "build-here":
        build_here()
    deadline = time.monotonic() + 5
    while native() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    print(native() - before)
    release.set()
    """
)


def gained_threads(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip().splitlines()[-1])


needs_proc = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in Linux's /proc")


def test_returns_the_result_from_another_thread_that_has_ended() -> None:
    seen: list[threading.Thread] = []
    assert on_passing_thread(lambda: seen.append(threading.current_thread()) or 42) == 42
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()


def test_raises_the_functions_own_exception_in_the_caller() -> None:
    def broken() -> None:
        raise ValueError("bad config")

    with pytest.raises(ValueError, match="bad config"):
        on_passing_thread(broken)


@needs_proc
def test_a_long_lived_thread_keeps_a_pool_and_a_passing_one_does_not() -> None:
    assert gained_threads("long-lived") == 1  # two OpenMP threads: the caller and one helper that stays
    assert gained_threads("passing") == 0


@needs_proc
def test_checking_a_models_config_leaves_no_pool_on_the_callers_thread() -> None:
    # the registry checks every checkpoint's config on the server's event loop thread at start
    assert gained_threads("build-here") == 1  # the shipped PixelCNN's masks are big enough to start one
    assert gained_threads("skeleton") == 0


def test_the_torch_thread_count_is_left_as_it_was() -> None:
    n = torch.get_num_threads()
    on_passing_thread(lambda: float(torch.ones(1 << 16).sum()))
    assert torch.get_num_threads() == n
