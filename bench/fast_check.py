"""Does the fast PixelCNN forward (models/fast.py) give the masked-convolution model's log-likelihoods?

For every image of a dataset (by default the whole Fashion-MNIST test set), log p(x) from the
reference forward pass (``PixelCNN.logits``: the masked convolutions of models/layers.py) and from
:class:`models.fast.FastPixelCNN` built from the same loaded checkpoint; prints the largest and mean
absolute difference in nats per dimension (the issue's bound: 1e-4). A conditional model is scored
with each image's own label.

    python bench/fast_check.py --model checkpoints/pixelcnn-fmnist --data fashion-mnist:test [--limit N] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.checkpoint import load_checkpoint
from models.pixelcnn import PixelCNN
from models.tools.data import load_dataset

logger = logging.getLogger("bench.fast_check")


@torch.inference_mode()
def compare(model: PixelCNN, images: torch.Tensor, labels: torch.Tensor | None, *, batch: int) -> dict[str, Any]:
    model.prepare_for_inference()
    fast = model.fast
    assert fast is not None, "the fast forward runs on CPU"
    dims = model.dims
    worst = total = 0.0
    n = images.shape[0]
    t0 = time.perf_counter()
    for s in range(0, n, batch):
        x = images[s : s + batch]
        y = None if labels is None or model.n_classes is None else labels[s : s + batch]
        model.fast = None
        ref = model.log_prob(x, y).double()
        model.fast = fast
        got = model.log_prob(x, y).double()
        diff = (ref - got).abs() / dims
        worst = max(worst, float(diff.max()))
        total += float(diff.sum())
        logger.info("%d/%d images, max |diff| so far %.3g nats/dim (%.0f s)", s + x.shape[0], n, worst,
                    time.perf_counter() - t0)  # fmt: skip
    return {"images": n, "max_abs_diff_nats_per_dim": worst, "mean_abs_diff_nats_per_dim": total / n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="checkpoints/pixelcnn-fmnist", help="a gated PixelCNN checkpoint folder")
    p.add_argument("--data", default="fashion-mnist:test", help="dataset spec (models/tools/data.py)")
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    model, _ = load_checkpoint(args.model)
    if not isinstance(model, PixelCNN):
        raise SystemExit(f"{args.model} is a {model.architecture}, not a gated PixelCNN")
    data = load_dataset(args.data)
    images, labels = data.images, data.labels
    if args.limit:
        images = images[: args.limit]
        labels = None if labels is None else labels[: args.limit]
    result = {"model": args.model, "data": args.data, **compare(model, images, labels, batch=args.batch)}
    result["within_1e-4"] = result["max_abs_diff_nats_per_dim"] <= 1e-4
    if args.json:
        print(json.dumps(result))  # noqa: T201 - the benchmark's output
    else:
        for k, v in result.items():
            print(f"{k}: {v}")  # noqa: T201


if __name__ == "__main__":
    main()
