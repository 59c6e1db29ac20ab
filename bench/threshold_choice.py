"""The served threshold against another confidence, on the Fashion-MNIST test set: the observed
false-positive rate of each, overall and on slices of 500 test images (what a 500-file check sees).

For each model the checkpoint is copied to a temporary folder and recalibrated there with its own
recorded `genserve calibrate` command plus ``--confidence C`` (the statistics come from the cache, so
this costs seconds); then the default score of the test images (cached statistics: run eval-ood or
bench/test_fpr_slices.py first) is compared with both thresholds. The conditional model is measured
on the first ``--cond-images`` of eval-ood's seeded test order (bench/test_fpr_slices.py's slices).

    python bench/threshold_choice.py --confidence 0.9 --cache .cache/ood \\
        --model checkpoints/pixelcnn-fmnist --model checkpoints/pixelcnn-fmnist-cond
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.scoring.scorer import load_scorer
from models.tools.ood_eval import load_eval_set
from models.tools.score_sets import score_images

SLICE = 1000  # bench/test_fpr_slices.py's slices of the seeded order
CHECK = 500  # the size of the upload-path check
CEILING = 0.013


def test_scores(model: Path, cache: str, cond_images: int) -> np.ndarray:
    """The default score (N,) of the test images: all 10,000, or for a class-conditional model the
    first ``cond_images`` of the seeded order, slice by slice as test_fpr_slices.py caches them."""
    scorer, meta = load_scorer(model)
    name = meta["calibration"]["default_score"]
    test = load_eval_set("fashion-mnist:test", shape=scorer.model.shape, levels=scorer.model.levels)
    if scorer.model.n_classes is None:
        parts = [test.images]
    else:
        order = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))
        parts = [test.images[order[s : s + SLICE].sort().values] for s in range(0, cond_images, SLICE)]
    got = [score_images(scorer, p, names=[name], cache_dir=cache or None, show_progress=False)[name] for p in parts]
    return np.concatenate(got)


def recalibrated(model: Path, confidence: float, into: Path) -> dict:
    """The calibration of ``model`` redone in a copy with ``--confidence``; the copy's default entry."""
    copy = into / model.name
    shutil.copytree(model, copy)
    cal = json.loads((model / "model.json").read_text())["calibration"]
    argv = shlex.split(cal["command"])
    argv[argv.index("--model") + 1] = str(copy)
    subprocess.run([*argv, "--confidence", str(confidence)], check=True, stdout=subprocess.DEVNULL)
    new = json.loads((copy / "model.json").read_text())["calibration"]
    return new["scores"][new["default_score"]]


def row(label: str, entry: dict, scores: np.ndarray) -> str:
    flagged = scores > entry["threshold"]
    slices = np.array([flagged[i : i + CHECK].mean() for i in range(0, len(flagged) - CHECK + 1, CHECK)])
    over = int((slices > CEILING).sum())
    return (
        f"| {label} | {entry['above']} of {entry['n']} | {flagged.mean():.2%} ({int(flagged.sum())} of {len(flagged)}) "
        f"| {slices[0]:.1%} | {slices.min():.1%} to {slices.max():.1%} | {over} of {len(slices)} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, help="checkpoint folder (repeatable)")
    p.add_argument("--confidence", type=float, default=0.9, help="the other threshold's confidence (0: conformal)")
    p.add_argument("--cache", default="runs/ood-cache", help="statistics cache")
    p.add_argument("--cond-images", type=int, default=3000, help="test images of a class-conditional model")
    args = p.parse_args()
    head = ["model, threshold", "calibration scores above", "test FPR", "first 500", "500-image slices", "over 1.3%"]
    print("| " + " | ".join(head) + " |\n|" + " --- |" * len(head))  # noqa: T201
    with tempfile.TemporaryDirectory() as tmp:
        for m in map(Path, args.model):
            scores = test_scores(m, args.cache, args.cond_images)
            cal = json.loads((m / "model.json").read_text())["calibration"]
            served = cal["scores"][cal["default_score"]]
            other = recalibrated(m, args.confidence, Path(tmp))
            what = "conformal" if served.get("confidence") is None else f"{served['confidence']:g}-confident"
            alt = "conformal" if not args.confidence else f"{args.confidence:g}-confident"
            print(row(f"{m.name}, served ({what})", served, scores), flush=True)  # noqa: T201
            print(row(f"{m.name}, {alt}", other, scores), flush=True)  # noqa: T201


if __name__ == "__main__":
    main()
