"""What a worker does with its model before it answers: a warm-up pass, then its best pass size.

:func:`warm_up` runs every score type once (and each compiled graph's batch size), so that no
request pays for a lazy initialisation. :func:`measure_pass_size` then finds the worker's best
pass size on its own device.

A larger batch is not always cheaper per image. On a GPU it nearly always is, up to the card's
memory; on a CPU a convolution's working set outgrows the caches, and the shipped PixelCNN can
score an image faster in passes of 8 than of 32 (docs/serving.md). A fixed ``max_batch_size`` is
then right for one model and wrong for the next, so each worker times its model's ``nll`` pass
(one class of a class-conditional model) at 1, 2, 4, ... ``max_batch_size`` images after the
warm-up. Its score and encode passes then hold at most ``max_batch_size`` images, as without the
sweep, unless a smaller size was faster per image by more than :data:`MARGIN` in the median and
in every round: sizes are timed round-robin, so a burst of load elsewhere on the machine hits
every size alike, and one lucky round cannot shrink the batches (a wrong small cap costs more
than a missed speed-up). Off by default (``GENSERVE_BATCH_SWEEP=true`` turns it on): timings taken
while other work loads the machine mislead even round-robin (a PixelRNN server started beside a busy
job chose passes of 4, where 32 is 1.4x faster per image on the idle machine; docs/serving.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from models.scoring.scorer import Scorer
from models.scoring.scores import DOSE, NLL

MARGIN = 0.10  # a smaller pass must be this much faster per image than the largest to be chosen
ROUNDS = 3  # timed passes per size, round-robin
MIN_ROUNDS = 2  # rounds run whatever the budget
BUDGET_S = 15.0  # no further round (beyond MIN_ROUNDS) once the sweep has taken this long


def sweep_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to ``max_batch``, and ``max_batch`` itself."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    sizes, n = [], 1
    while n < max_batch:
        sizes.append(n)
        n *= 2
    return [*sizes, max_batch]


def best_size(seconds: dict[int, list[float]], *, margin: float = MARGIN) -> int:
    """The pass size to use, from each size's wall times (s), one per round: the largest size,
    unless a smaller one is faster per image by more than ``margin`` in its median *and* faster in
    every round (one noisy round must not shrink the batches); then the fastest such size."""
    if not seconds:
        raise ValueError("no timed batch sizes")
    largest = max(seconds)
    per_image = {n: np.asarray(t, dtype=np.float64) / n for n, t in seconds.items()}
    ref = per_image[largest]
    better = [
        n
        for n, t in per_image.items()
        if n != largest
        and len(t) == len(ref)
        and float(np.median(t)) < (1.0 - margin) * float(np.median(ref))
        and bool((t < ref).all())
    ]
    return min(better, key=lambda n: float(np.median(per_image[n]))) if better else largest


def time_sizes(
    run: Callable[[int], None],
    sizes: list[int],
    *,
    rounds: int = ROUNDS,
    min_rounds: int = MIN_ROUNDS,
    budget_s: float = BUDGET_S,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[int, list[float]]:
    """The wall times (s) of ``run(n)`` for each n in ``sizes``, one per round, in up to ``rounds``
    round-robin rounds (so a burst of load elsewhere hits every size alike); a round beyond
    ``min_rounds`` starts only while the elapsed time is under ``budget_s``."""
    times: dict[int, list[float]] = {n: [] for n in sizes}
    start = clock()
    for r in range(rounds):
        if r >= min_rounds and clock() - start > budget_s:
            break
        for n in sizes:
            t = clock()
            run(n)
            times[n].append(clock() - t)
    return times


def sweep(
    run: Callable[[int], None], max_batch: int, *, rounds: int = ROUNDS, budget_s: float = BUDGET_S
) -> tuple[int, dict[int, list[float]]]:
    """Time ``run(n)`` (one pass of n images, synchronised) at :func:`sweep_sizes` and return (the
    :func:`best_size`, the timings in seconds per size and round)."""
    seconds = time_sizes(run, sweep_sizes(max_batch), rounds=rounds, min_rounds=min(rounds, MIN_ROUNDS),
                         budget_s=budget_s)  # fmt: skip
    return best_size(seconds), seconds


def warm_up(scorer: Scorer, device: str, max_batch: int) -> None:
    """One pass of every score type at each batch size a compiled graph exists for (else one image)."""
    model = scorer.model
    labelled = [n for n in scorer.score_types if n != DOSE]  # dose judges p(x): no labels
    for n in model.warmup_batch_sizes(max_batch):  # each compiled graph, if any
        x, y = _blank(scorer, device, n)
        scorer.compute(x, y, labelled)
        if DOSE in scorer.score_types:
            scorer.compute(x, None, [DOSE])


def measure_pass_size(scorer: Scorer, device: str, max_batch: int) -> tuple[int, dict[int, list[float]]]:
    """:func:`sweep` of the ``nll`` score's pass over blank images (the passes' cost does not depend
    on the pixels), labelled for a class-conditional model (one class pass, not one per class)."""
    x, y = _blank(scorer, device, max_batch)

    def run(n: int) -> None:
        got = scorer.compute(x[:n], None if y is None else y[:n], [NLL])
        got.scores[NLL].cpu()  # waits for a CUDA device

    return sweep(run, max_batch)


def _blank(scorer: Scorer, device: str, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """n black images (n, C, H, W) uint8 on ``device``, and class 0 labels for a conditional model."""
    model = scorer.model
    x = torch.zeros(n, *model.shape, dtype=torch.uint8, device=device)
    y = torch.zeros(n, dtype=torch.long, device=device) if model.n_classes is not None else None
    return x, y
