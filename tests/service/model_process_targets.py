"""Model-process entry points with faults, for tests/service/test_model_process.py. Each runs in a
spawned process (so it is importable by name), patches what it needs there, then serves as usual."""

from __future__ import annotations

import os
import time
from multiprocessing.connection import Connection
from typing import Any

import torch

import service.model_process as mp_module
import service.scoring

POISON = 255  # an image whose every pixel is white


def _poisoned(x: torch.Tensor) -> bool:
    return bool((x.flatten(1) == POISON).all(1).any())


def crash_on_poison(conn: Connection, folder: str, device: str, limits: dict[str, Any], name: str) -> None:
    """A model process that dies (as a segfault would) on a pass holding an all-white image."""
    original = service.scoring.compute

    def compute(scorer: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if _poisoned(x):
            os._exit(3)
        return original(scorer, x, *args, **kwargs)

    service.scoring.compute = compute
    mp_module.serve(conn, folder, device, limits, name)


def raise_on_poison(conn: Connection, folder: str, device: str, limits: dict[str, Any], name: str) -> None:
    """A model process whose pass raises on an all-white image."""
    original = service.scoring.compute

    def compute(scorer: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if _poisoned(x):
            raise ValueError("this image breaks the model")
        return original(scorer, x, *args, **kwargs)

    service.scoring.compute = compute
    mp_module.serve(conn, folder, device, limits, name)


def slow_rows(conn: Connection, folder: str, device: str, limits: dict[str, Any], name: str) -> None:
    """A model process whose generations take 0.3 s per reported row."""
    original = mp_module._row_reporter

    def reporter(c: Connection, pass_id: int, index: int) -> Any:
        report = original(c, pass_id, index)

        def on_row(rows: int, images: torch.Tensor) -> None:
            report(rows, images)
            time.sleep(0.3)

        return on_row

    mp_module._row_reporter = reporter
    mp_module.serve(conn, folder, device, limits, name)


def never_ready(conn: Connection, folder: str, device: str, limits: dict[str, Any], name: str) -> None:
    """A model process that fails to load."""
    mp_module.serve(conn, folder + "-missing", device, limits, name)


def slow_first_pass(conn: Connection, folder: str, device: str, limits: dict[str, Any], name: str) -> None:
    """A model process whose first pass after loading takes a second (requests queue behind it)."""
    original = service.scoring.compute
    calls: list[int] = []

    def compute(scorer: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append(x.shape[0])
        if len(calls) == 1:
            time.sleep(1.0)
        return original(scorer, x, *args, **kwargs)

    service.scoring.compute = compute
    mp_module.serve(conn, folder, device, {**limits, "warmup": False}, name)


def deaf(conn: Connection, folder: str, device: str, limits: dict[str, Any], name: str) -> None:
    """A model process that loads, says ready, then ignores every message and its pipe's end (hung)."""

    def read(c: Connection, passes: Any, cancelled: Any) -> None:
        while True:
            time.sleep(1.0)

    mp_module._read = read
    mp_module.serve(conn, folder, device, limits, name)


THREADS_LOG = "GENSERVE_TEST_THREADS_LOG"  # a file: each pass appends "pid threads" (held a second on POISON)


def record_threads(conn: Connection, folder: str, device: str, limits: dict[str, Any], name: str) -> None:
    """A model process that writes down the CPU threads of each pass, and holds a pass that carries
    an all-white image for a second (so that another worker's pass runs beside it)."""
    original = service.scoring.compute

    def compute(scorer: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        with open(os.environ[THREADS_LOG], "a") as f:
            f.write(f"{os.getpid()} {torch.get_num_threads()}\n")
        if _poisoned(x):
            time.sleep(1.0)
        return original(scorer, x, *args, **kwargs)

    service.scoring.compute = compute
    mp_module.serve(conn, folder, device, {**limits, "warmup": False}, name)
