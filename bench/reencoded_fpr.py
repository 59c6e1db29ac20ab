"""How the gate treats Fashion-MNIST images that were re-encoded on their way: the share of test
images flagged when sent as the exact PNG (the served false-positive rate), as JPEG at quality 95
and 75, upscaled 2x (bicubic PNG), and upscaled 4x then saved as JPEG at quality 90 (a screenshot
of an image viewer, say); each file through /score's own conversion with resize=true.

The models were trained and calibrated on exact 8-bit images: JPEG ringing puts faint values into
the black background and resampling blurs edges, which the default score's statistics see. So this
measures a limit of the gate (what it refuses that a person would call in-distribution), not a
target. Builds the files under ``--out`` from the first ``--images`` test images, then runs
``genserve eval-ood`` with the PNGs as the in-distribution set.

    python bench/reencoded_fpr.py --images 300 --cache .cache/ood --model checkpoints/vae-fmnist
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.tools.ood_eval import load_eval_set

VARIANTS = ("jpeg95", "jpeg75", "up2x", "up4x-jpeg90")


def build(out: Path, n: int) -> None:
    """The first ``n`` test images as exact PNGs and as each variant, one folder per kind."""
    images = load_eval_set("fashion-mnist:test", shape=(1, 28, 28), levels=256).images[:n, 0].numpy()
    for kind in ("png", *VARIANTS):
        (out / kind).mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(images.astype(np.uint8)):
        im = Image.fromarray(a)
        im.save(out / "png" / f"{i:04d}.png")
        im.save(out / "jpeg95" / f"{i:04d}.jpg", quality=95)
        im.save(out / "jpeg75" / f"{i:04d}.jpg", quality=75)
        im.resize((56, 56), Image.Resampling.BICUBIC).save(out / "up2x" / f"{i:04d}.png")
        im.resize((112, 112), Image.Resampling.BICUBIC).save(out / "up4x-jpeg90" / f"{i:04d}.jpg", quality=90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, help="checkpoint folder (repeatable)")
    p.add_argument("--images", type=int, default=300, help="test images per kind (the first N)")
    p.add_argument("--out", default="runs/reencoded", help="where the files are built")
    p.add_argument("--cache", default="runs/ood-cache", help="statistics cache ('' for none)")
    args = p.parse_args()
    out = Path(args.out)
    build(out, args.images)
    print(f"| model | exact PNG ({args.images}) | " + " | ".join(VARIANTS) + " |")  # noqa: T201
    print("| --- | --- |" + " --- |" * len(VARIANTS))  # noqa: T201
    for model in args.model:
        with tempfile.TemporaryDirectory() as tmp:
            argv = ["genserve", "eval-ood", "--model", model, "--in", f"files:{out / 'png'}"]
            argv += [a for v in VARIANTS for a in ("--out", f"files:{out / v}")]
            argv += ["--examples", "0", "--cache", args.cache, "--report-dir", tmp, "--no-progress"]
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            report = json.loads((Path(tmp) / f"{Path(model).name}.json").read_text())
        name = report["default_score"]
        cells = [f"{report['in']['scores'][name]['observed_fpr_at_threshold']:.1%}"]
        for v in VARIANTS:
            s = report["out"][f"files:{out / v}"]["scores"][name]
            cells.append(f"{s['flagged_at_threshold']:.1%} (AUROC {s['auroc']:.3f})")
        print(f"| {Path(model).name} | " + " | ".join(cells) + " |", flush=True)  # noqa: T201


if __name__ == "__main__":
    main()
