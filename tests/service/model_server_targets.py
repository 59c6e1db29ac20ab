"""Model-server entry points with faults, for tests/service/test_http_processes.py. Each runs in a
spawned process (so it is importable by name), patches what it needs there, then serves as usual."""

from __future__ import annotations

import os
import time
from multiprocessing.connection import Connection
from typing import Any

import torch

import service.model_server
import service.scoring

PASS_S = 0.4  # every pass takes at least this long, so that batches sent meanwhile queue and merge


def faulty(
    control: Connection, path: str, key: str, folder: str, device: str, limits: dict[str, Any], name: str
) -> None:
    """A model server whose passes are slow (score passes and each row of a generation take PASS_S),
    raise on an all-white image (255) and crash, as a segfault would, on an all-black one (0)."""
    original = service.scoring.compute

    def compute(scorer: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        flat = x.flatten(1)
        if bool((flat == 0).all(1).any()):
            os._exit(3)
        time.sleep(PASS_S)
        if bool((flat == 255).all(1).any()):
            raise ValueError("this image breaks the model")
        return original(scorer, x, *args, **kwargs)

    service.scoring.compute = compute
    original_rows = service.model_server._row_reporter

    def reporter(client: Any, pass_id: int, index: int) -> Any:  # and generations report a row every PASS_S
        report = original_rows(client, pass_id, index)

        def on_row(rows: int, images: torch.Tensor) -> None:
            report(rows, images)
            time.sleep(PASS_S)

        return on_row

    service.model_server._row_reporter = reporter
    service.model_server.serve(control, path, key, folder, device, {**limits, "warmup": False}, name)
