"""The dose score's kernel tails: what they cost per batch, before and after session 12.

Each statistic's normal score needs both tails of a value under the kernel density of its 5,000
calibration values (models/scoring/dose.py ``ln_tails``). Session 12 computes them as means of
Phi in float64, falling back to log space only for far outliers; before, every value went through a
log-sum-exp of log Phi. Both are timed here on the same batches of a shipped calibration, alternating,
and checked to agree.

    python bench/kernel_tails.py --model checkpoints/pixelrnn-fmnist --model checkpoints/pixelcnn-fmnist --batch 32
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.scoring.dose import DoseFit, ln_tails
from models.scoring.scorer import load_scorer

Tails = Callable[..., tuple[np.ndarray, np.ndarray]]


def log_space_tails(values: np.ndarray, *, centres: np.ndarray, bandwidth: float) -> tuple[np.ndarray, np.ndarray]:
    """The pre-session-12 computation: log-sum-exp of log Phi over every centre."""
    v = torch.as_tensor(values, dtype=torch.float64)[:, None]
    c = torch.as_tensor(centres, dtype=torch.float64)[None, :]
    t = (c - v) / bandwidth
    log_m = math.log(c.shape[1])
    up = torch.logsumexp(torch.special.log_ndtr(t), dim=1) - log_m
    lo = torch.logsumexp(torch.special.log_ndtr(-t), dim=1) - log_m
    return up.numpy(), lo.numpy()


def all_tails(fn: Tails, batch: list[np.ndarray], fit: DoseFit) -> list[tuple[np.ndarray, np.ndarray]]:
    """Both tails of every statistic's values in the batch under ``fn``."""
    return [fn(v, centres=c, bandwidth=float(h)) for v, c, h in zip(batch, fit.centres, fit.bandwidths, strict=True)]


def largest_difference(a: list[tuple[np.ndarray, np.ndarray]], b: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """The largest |a - b| / max(1, |b|) over every statistic, tail and value."""
    pairs = [(x, y) for ta, tb in zip(a, b, strict=True) for x, y in zip(ta, tb, strict=True)]
    return max(float(np.max(np.abs(x - y) / np.maximum(1.0, np.abs(y)))) for x, y in pairs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(1)  # as a loaded server's scoring thread sees it
    for folder in args.model:
        fit = load_scorer(folder)[0].dose
        if fit is None:
            print(f"{folder}: no dose calibration")  # noqa: T201
            continue
        rng = np.random.default_rng(0)
        # values drawn from each statistic's calibration sample, a tenth of them scaled far outside it
        far = np.where(rng.uniform(size=args.batch) < 0.1, 5.0, 1.0)
        batch = [rng.choice(c, size=args.batch) * far for c in fit.centres]
        times: dict[str, list[float]] = {"log space": [], "Phi means": []}
        for _ in range(args.repeats):  # alternating, so that a busy machine slows both alike
            for name, fn in (("log space", log_space_tails), ("Phi means", ln_tails)):
                t = time.perf_counter()
                all_tails(fn, batch, fit)
                times[name].append(time.perf_counter() - t)
        worst = largest_difference(all_tails(ln_tails, batch, fit), all_tails(log_space_tails, batch, fit))
        old, new = statistics.median(times["log space"]), statistics.median(times["Phi means"])
        print(  # noqa: T201
            f"{Path(folder).name}: {len(fit.statistics)} statistics x {fit.centres.shape[1]} centres, "
            f"batch {args.batch}, 1 thread: log space {1e3 * old:.1f} ms, Phi means {1e3 * new:.1f} ms, "
            f"{old / new:.2f}x; largest relative difference {worst:.1e}"
        )


if __name__ == "__main__":
    main()
