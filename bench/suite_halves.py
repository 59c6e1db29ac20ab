"""Share of each kind of the real-upload suite flagged by a model's calibrated default score alone (the
colour check of models/scoring/colour.py aside: this bench is for designing statistics), on the
even-indexed files of each kind (the half the statistics were designed on) and on the odd-indexed
files (held out while designing), beside the calibration's statistics. With ``--statistics`` it
fits a dose variant on the calibration's data first (same split and seed as ``genserve calibrate``)
instead of reading the model's; nothing is written.

    python bench/suite_halves.py --model checkpoints/pixelcnn-fmnist --cache .cache/ood
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from models.image_convert import file_to_levels
from models.scoring.calibration import calibrate_scores
from models.scoring.dose import fit_dose
from models.scoring.scorer import load_scorer
from models.tools.ood_eval import load_eval_set, suite_files
from models.tools.score_sets import dataset_statistics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--suite", default="data/upload-suite")
    p.add_argument("--cache", default="runs/ood-cache")
    p.add_argument("--statistics", help="comma list: fit this dose variant on the calibration data instead")
    args = p.parse_args()
    scorer, meta = load_scorer(args.model)
    cal = meta["calibration"]
    shape, levels = scorer.model.shape, scorer.model.levels
    if args.statistics:
        data = load_eval_set(cal["data"], shape=shape, levels=levels, limit=cal["n"])
        stats = dataset_statistics(scorer, data.images, cache_dir=args.cache, show_progress=False)
        fit, scores, _ = fit_dose(stats, args.statistics.split(","))
        threshold = calibrate_scores(scores, fpr=cal["target_fpr"])["threshold"]
    else:
        fit, threshold = scorer.dose, cal["scores"]["dose"]["threshold"]
    assert fit is not None, f"{args.model} has no dose calibration"
    print(f"{Path(args.model).name}: {', '.join(fit.statistics)}; threshold {threshold:.2f}")  # noqa: T201
    print("| kind | even (design) | odd (held out) |\n| --- | --- | --- |")  # noqa: T201
    for kind in sorted(d for d in Path(args.suite).iterdir() if d.is_dir()):
        files = suite_files(kind)
        x = torch.from_numpy(np.stack([file_to_levels(f.read_bytes(), shape, levels) for f in files]))
        flagged = fit.score(dataset_statistics(scorer, x, cache_dir=args.cache, show_progress=False)) > threshold
        even, odd = flagged[0::2], flagged[1::2]
        cells = [f"{h.mean():.1%} ({h.sum()}/{len(h)})" for h in (even, odd)]
        print(f"| {kind.name} | {cells[0]} | {cells[1]} |")  # noqa: T201


if __name__ == "__main__":
    main()
