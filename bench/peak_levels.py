"""The peak check's evidence (models/scoring/peak.py): per data set, the brightest pixel of each image
as /score sees it (8-bit), and the share below a floor (default 190 = 254 - 64, the shipped check's).
No model is run.

Sets: Fashion-MNIST's splits (exact arrays), its validation images re-encoded as ``genserve calibrate
--reencode`` re-encodes them (JPEG quality 70-95, upscaled 2-4x, decoded back through /score's
conversion), MNIST, and every kind of a folder of image files (``--suite``: the real-upload suite's
kinds, or a probe set of bench/upload_probe.py), converted with each ``fit``.

    python bench/peak_levels.py --suite data/upload-suite --suite runs/upload-probe-5
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from models.image_convert import FITS, file_to_levels
from models.scoring.peak import peak_levels
from models.tools.data import load_dataset
from models.tools.ood_eval import suite_files
from models.tools.reencode import reencode

SPLITS = ("fashion-mnist:train", "fashion-mnist:valid", "fashion-mnist:test", "mnist")


def row(name: str, peaks: np.ndarray, floor: int) -> str:
    q = np.quantile(peaks, [0.0, 0.001, 0.01, 0.5]) if peaks.size else np.zeros(4)
    dim = peaks < floor
    cells = [name, str(peaks.size), *(f"{v:.0f}" for v in q), f"{dim.mean():.2%} ({int(dim.sum())})"]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--floor", type=int, default=190, help="8-bit level below which an image counts as dim")
    p.add_argument("--suite", action="append", default=[], help="a folder of kinds (subfolders of image files)")
    p.add_argument("--reencoded", type=int, default=5000, help="validation images to re-encode (0: none)")
    args = p.parse_args()
    print(f"| set | n | min | 0.1% | 1% | median | below {args.floor} |")  # noqa: T201
    print("| --- | --- | --- | --- | --- | --- | --- |")  # noqa: T201
    for spec in SPLITS:
        images = load_dataset(spec).images
        print(row(spec, peak_levels(images.numpy(), 256), args.floor), flush=True)  # noqa: T201
        if spec == "fashion-mnist:valid" and args.reencoded:
            again = reencode(images[: args.reencoded], 256)
            print(row(f"{spec} re-encoded ({args.reencoded})", peak_levels(again.numpy(), 256), args.floor))  # noqa: T201
    for root in args.suite:
        for kind in sorted(d for d in Path(root).iterdir() if d.is_dir() and suite_files(d)):
            for fit in FITS:
                files = suite_files(kind)
                peaks = np.array([file_to_levels(f.read_bytes(), (1, 28, 28), 256, fit=fit).max() for f in files])
                print(row(f"{Path(root).name}/{kind.name} ({fit})", peaks, args.floor), flush=True)  # noqa: T201


if __name__ == "__main__":
    main()
