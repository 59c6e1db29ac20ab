"""What does an outlier score cost, relative to one forward pass of the main model?

For each model: the time of one forward pass (an autoregressive model's ``log_prob``; a VAE's
encoder and one decoder pass, ``iwae(x, k=1)``), and of every score type as the service computes it
(``Scorer.compute``: the model, the background model where the score needs it, the WebP coder), on
the same batches, interleaved so that a busy machine slows both alike. Prints a table and JSON;
the ratio of the default score is what docs/ood.md reports (target: at most 2.5). For a VAE it also
times the model's own ``log_prob`` (IWAE with ``iwae_samples``) once, for scale.

    python bench/outlier_cost.py --model checkpoints/pixelcnn-fmnist --model checkpoints/vae-fmnist
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.scoring.calibration import default_score_type
from models.scoring.scorer import Scorer, load_scorer
from models.vae import VAE


def forward(scorer: Scorer, x: torch.Tensor) -> None:
    """One forward pass of the main model (a class-conditional model's: log p(x|y) for one class y;
    its p(x) = sum_y p(x|y) p(y), which every unlabelled score needs, takes one pass per class)."""
    model = scorer.model
    with torch.inference_mode():
        if isinstance(model, VAE):
            model.iwae(x, 1)
        elif model.n_classes is not None:
            model.log_prob(x, torch.zeros(len(x), dtype=torch.long, device=x.device))
        else:
            model.log_prob(x)


def measure(folder: str, *, batch: int, repeats: int, device: str, scores: list[str] | None = None) -> dict[str, Any]:
    scorer, meta = load_scorer(folder, device)
    default = default_score_type(meta, background=scorer.background is not None)
    names = [n for n in scorer.score_types if not scores or n in scores or n == default]
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, *scorer.model.shape), generator=gen, dtype=torch.uint8).to(device)
    # Real-looking images matter little for the cost; a fixed random batch keeps the script data-free.
    runs: dict[str, list[float]] = {"forward": [], **{n: [] for n in names}}
    forward(scorer, x)  # warm-up
    for n in names:
        scorer.compute(x, None, [n])
    for _ in range(repeats):
        for name in runs:
            t0 = time.perf_counter()
            if name == "forward":
                forward(scorer, x)
            else:
                scorer.compute(x, None, [name])
            runs[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in runs.items()}
    if isinstance(scorer.model, VAE):  # for scale: the model's own log_prob (IWAE with iwae_samples)
        t0 = time.perf_counter()
        with torch.inference_mode():
            scorer.model.log_prob(x)
        med["log_prob"] = time.perf_counter() - t0
    return {
        "model": folder,
        "batch": batch,
        "repeats": repeats,
        "device": device,
        "default_score": default,
        "vae_score_k": scorer.vae_score_k if isinstance(scorer.model, VAE) else None,
        "vae_iwae_samples": scorer.model.config.iwae_samples if isinstance(scorer.model, VAE) else None,
        "forward_images_per_s": batch / med["forward"],
        "seconds": med,
        "ratio_to_forward": {k: med[k] / med["forward"] for k in names},
        "default_ratio": med[default] / med["forward"],
        "log_prob_ratio": med["log_prob"] / med["forward"] if "log_prob" in med else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, help="checkpoint folder (repeatable)")
    p.add_argument("--batch", type=int, default=32, help="images per pass (the service's default batch)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--scores", help="comma-separated score types to time (default: all; the default always)")
    args = p.parse_args()
    scores = args.scores.split(",") if args.scores else None
    results = [
        measure(m, batch=args.batch, repeats=args.repeats, device=args.device, scores=scores) for m in args.model
    ]
    print(f"{'model':32} {'forward img/s':>14} {'score':>18} {'ratio':>7}")  # noqa: T201
    for r in results:
        for name, ratio in r["ratio_to_forward"].items():
            mark = " (default)" if name == r["default_score"] else ""
            print(f"{r['model']:32} {r['forward_images_per_s']:14.1f} {name + mark:>18} {ratio:7.2f}")  # noqa: T201
        if r["log_prob_ratio"] is not None:
            k = f"log_prob (k={r['vae_iwae_samples']})"
            print(f"{r['model']:32} {r['forward_images_per_s']:14.1f} {k:>18} {r['log_prob_ratio']:7.2f}")  # noqa: T201
    print(json.dumps(results, indent=2))  # noqa: T201


if __name__ == "__main__":
    main()
