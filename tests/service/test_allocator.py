"""service/allocator.py: memory a pass frees stays with malloc for the next pass (glibc)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from service import allocator, loading
from service.registry import ModelRegistry
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
glibc = pytest.mark.skipif(allocator._glibc() is None, reason="mallopt's thresholds are glibc's")

# Two threads run a small conv net over 8 images, as a VAE share does: activations of 1.6 MiB each,
# freed layer after layer. Print the page faults of the second round.
CHURN = """
import json, resource, sys, threading, torch
from service.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
torch.set_num_threads(1)
x, conv = torch.randn(8, 64, 28, 28), torch.nn.Conv2d(64, 64, 3, padding=1)
def share():
    with torch.inference_mode():
        for _ in range(10):
            y = x
            for _ in range(6):
                y = torch.nn.functional.elu(conv(y)) + y
def run():
    threads = [threading.Thread(target=share) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
run()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
run()
print(json.dumps({"kept": kept, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def churn(mode: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", CHURN, mode], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@glibc
def test_freed_blocks_stay_with_malloc_instead_of_being_faulted_in_again() -> None:
    default, kept = churn("default"), churn("keep")
    assert kept["kept"] is True and default["kept"] is None
    # glibc's defaults hand the freed activations back to the kernel (tens of thousands of faults on
    # this machine); with the thresholds fixed the second round reuses the first round's memory.
    assert kept["faults"] * 5 < default["faults"]


def test_off_glibc_nothing_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator._glibc() is None and allocator.keep_freed_memory() is False


def test_the_setting_reaches_every_worker_and_is_on_by_default(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert ModelRegistry.batch_limits(Settings(model_dir=model_dir)).keep_freed_memory is True
    limits = ModelRegistry.batch_limits(Settings(model_dir=model_dir, keep_freed_memory=False))
    assert limits.keep_freed_memory is False
    calls: list[bool] = []
    monkeypatch.setattr(loading, "keep_freed_memory", lambda: calls.append(True) or True)
    loading.load_for_serving(model_dir / "vae", "cpu", limits)
    assert calls == []
    loading.load_for_serving(model_dir / "vae", "cpu", ModelRegistry.batch_limits(Settings(model_dir=model_dir)))
    assert calls == [True]
