"""What a worker does with its model before it answers: a warm-up pass, then its best pass size.

:func:`warm_up` runs every score type once (and each compiled graph's batch size), so that no
request pays for a lazy initialisation. :func:`measure_pass_size` then finds the worker's best
pass size on its own device.

A larger batch is not always cheaper per image. On a GPU it nearly always is, up to the card's
memory; on a CPU a convolution's working set outgrows the caches, and the shipped PixelCNN can
score an image faster in passes of 8 than of 32 (docs/serving.md). A fixed ``max_batch_size`` is
then right for one model and wrong for the next, so each worker times its model's ``nll`` pass
(one class of a class-conditional model) at 1, 2, 4, ... ``max_batch_size`` images after the
warm-up, and its score and encode passes hold at most the smallest size whose time per image is
within :data:`TOLERANCE` of the fastest (fewer images per pass at the same throughput: shorter
waits). Sizes are timed round-robin and the best time of each is kept, so a burst of load
elsewhere on the machine cannot favour one size; the sweep stops repeating once it has spent its
time budget. ``GENSERVE_BATCH_SWEEP=false`` keeps ``max_batch_size`` as the cap.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from models.scoring.scorer import Scorer
from models.scoring.scores import DOSE, NLL

TOLERANCE = 0.05  # a size within 5% of the fastest time per image counts as fastest
ROUNDS = 3  # timed passes per size, round-robin
BUDGET_S = 10.0  # no further round once the sweep has taken this long (every size is timed once)


def sweep_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to ``max_batch``, and ``max_batch`` itself."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    sizes, n = [], 1
    while n < max_batch:
        sizes.append(n)
        n *= 2
    return [*sizes, max_batch]


def best_size(seconds: dict[int, float], *, tolerance: float = TOLERANCE) -> int:
    """The smallest batch size whose time per image (``seconds[n] / n``, the best of its passes) is
    within ``tolerance`` of the fastest."""
    if not seconds:
        raise ValueError("no timed batch sizes")
    per_image = {n: s / n for n, s in seconds.items()}
    fastest = min(per_image.values())
    return min(n for n, t in per_image.items() if t <= fastest * (1.0 + tolerance))


def time_sizes(
    run: Callable[[int], None],
    sizes: list[int],
    *,
    rounds: int = ROUNDS,
    budget_s: float = BUDGET_S,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[int, float]:
    """The best wall time (s) of ``run(n)`` for each n in ``sizes``, over up to ``rounds`` round-robin
    rounds; after the first, a round starts only while the elapsed time is under ``budget_s``."""
    best = dict.fromkeys(sizes, float("inf"))
    start = clock()
    for r in range(rounds):
        if r and clock() - start > budget_s:
            break
        for n in sizes:
            t = clock()
            run(n)
            best[n] = min(best[n], clock() - t)
    return best


def sweep(
    run: Callable[[int], None], max_batch: int, *, rounds: int = ROUNDS, budget_s: float = BUDGET_S
) -> tuple[int, dict[int, float]]:
    """Time ``run(n)`` (one pass of n images, synchronised) at :func:`sweep_sizes` and return (the
    :func:`best_size`, the timings in seconds)."""
    seconds = time_sizes(run, sweep_sizes(max_batch), rounds=rounds, budget_s=budget_s)
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


def measure_pass_size(scorer: Scorer, device: str, max_batch: int) -> tuple[int, dict[int, float]]:
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
