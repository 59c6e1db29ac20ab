"""A served model's false-positive rate on the Fashion-MNIST test set, grown slice by slice.

The conditional model's statistics take ten class passes per image (about 25 minutes per 1,000 test
images on a 2-core CPU), so its test FPR is measured on seeded subsets. ``fashion-mnist:test@N`` in
``genserve eval-ood`` takes the first N of one seeded permutation (seed 0), sorted; this bench scores
the permutation's slices ``[0, 1000)``, ``[1000, 2000)``, ... up to ``--images`` separately, so each
slice's statistics are cached once (``--cache``) and a later run adds slices instead of starting
over. Prints each slice's flagged count at the calibrated threshold of the default score and the
running total. Arrays, as eval-ood's ``--in``: a 28x28 Fashion-MNIST PNG sent with ``resize=true``
converts to the same array (tests/tools/test_upload_suite.py) and has no colour to check.

    python bench/test_fpr_slices.py --model checkpoints/pixelcnn-fmnist-cond --images 2000 --cache .cache/ood
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.scoring.scorer import load_scorer
from models.tools.ood_eval import load_eval_set
from models.tools.score_sets import score_images

SLICE = 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="checkpoint folder")
    p.add_argument("--images", type=int, default=2000, help="test images in all, a multiple of 1,000")
    p.add_argument("--cache", default="runs/ood-cache", help="statistics cache ('' for none)")
    args = p.parse_args()
    scorer, meta = load_scorer(args.model)
    cal = meta["calibration"]
    name = cal["default_score"]
    threshold = cal["scores"][name]["threshold"]
    test = load_eval_set("fashion-mnist:test", shape=scorer.model.shape, levels=scorer.model.levels)
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))  # eval-ood's SPEC@N order
    flagged = seen = 0
    print(f"{Path(args.model).name}: default score {name}, threshold {threshold:.4f}")  # noqa: T201
    for start in range(0, min(args.images, len(test)), SLICE):
        idx = order[start : start + SLICE].sort().values
        s = score_images(scorer, test.images[idx], names=[name], cache_dir=args.cache or None, show_progress=False)
        n = int((s[name] > threshold).sum())
        flagged, seen = flagged + n, seen + len(idx)
        print(  # noqa: T201 - the benchmark's output
            f"test images [{start}, {start + len(idx)}) of the seeded order: {n} of {len(idx)} flagged; "
            f"so far {flagged} of {seen} = {flagged / seen:.2%}",
            flush=True,
        )


if __name__ == "__main__":
    main()
