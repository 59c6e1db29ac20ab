"""Fill the statistics cache (``--cache`` of ``genserve calibrate`` and ``genserve eval-ood``) for a
model and a list of data specs in one go, on any device: the statistics of each set are computed
exactly as those commands compute them (same chunks, same cache keys), so afterwards they run
without a model pass. Its use: run it where a GPU is, bring the cache folder back, calibrate and
evaluate on the CPU.

    python bench/fill_stats_cache.py --model checkpoints/pixelcnn-fmnist --device cuda --cache .cache/ood \\
        fashion-mnist:valid fashion-mnist:test mnist noise:uniform constant flip:fashion-mnist:test \\
        hflip:fashion-mnist:test --suite data/upload-suite
"""

from __future__ import annotations

import argparse
import time

from models.scoring.scorer import load_scorer
from models.tools.ood_eval import load_eval_set, suite_specs
from models.tools.score_sets import dataset_statistics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("specs", nargs="*", help="data specs as eval-ood takes them (a calibration's: NAME:valid)")
    p.add_argument("--model", required=True)
    p.add_argument("--suite", help="add files:SUITE/KIND for every kind of the upload suite")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache", default="runs/ood-cache")
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args()
    scorer, _ = load_scorer(args.model, args.device)
    specs = list(args.specs) + (suite_specs(args.suite) if args.suite else [])
    for spec in specs:
        t = time.perf_counter()
        data = load_eval_set(spec, shape=scorer.model.shape, levels=scorer.model.levels)
        dataset_statistics(scorer, data.images, batch_size=args.batch_size, cache_dir=args.cache, show_progress=False)
        print(f"{spec}: {len(data)} images, {time.perf_counter() - t:.1f} s")  # noqa: T201


if __name__ == "__main__":
    main()
