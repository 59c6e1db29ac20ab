"""The peak and extent checks' evidence (models/scoring/peak.py, models/scoring/extent.py): per data set,
the brightest pixel of each image as /score sees it (8-bit), and the share below a floor (default 190 =
254 - 64, the shipped check's); with ``--check extent`` the pixels each image's object spans (its
pixels above level 4) and the share below 24 = 26 - 2. No model is run.

Sets: Fashion-MNIST's splits (exact arrays), its validation images re-encoded as ``genserve calibrate
--reencode`` re-encodes them (JPEG quality 70-95, upscaled 2-4x, decoded back through /score's
conversion), MNIST, and every kind of a folder of image files (``--suite``: the real-upload suite's
kinds, or a probe set of bench/upload_probe.py), converted with each ``fit``.

    python bench/peak_levels.py --suite data/upload-suite --suite runs/upload-probe-5
    python bench/peak_levels.py --check extent --suite data/upload-suite --suite runs/upload-probe-1
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from models.image_convert import FITS, file_to_levels
from models.scoring.extent import DEFAULT_LEVEL, extents
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


FLOORS = {"peak": 190, "extent": 24}


def measure(images: np.ndarray, check: str) -> np.ndarray:
    """(N,) per image of (N, C, H, W) 8-bit levels: its brightest pixel, or its extent in pixels."""
    return peak_levels(images, 256) if check == "peak" else extents(images, 256, DEFAULT_LEVEL)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", choices=tuple(FLOORS), default="peak", help="what to measure (default peak)")
    p.add_argument("--floor", type=int, help="the value below which an image is refused (default 190; extent: 24)")
    p.add_argument("--suite", action="append", default=[], help="a folder of kinds (subfolders of image files)")
    p.add_argument("--reencoded", type=int, default=5000, help="validation images to re-encode (0: none)")
    args = p.parse_args()
    args.floor = FLOORS[args.check] if args.floor is None else args.floor
    print(f"| set | n | min | 0.1% | 1% | median | below {args.floor} |")  # noqa: T201
    print("| --- | --- | --- | --- | --- | --- | --- |")  # noqa: T201
    for spec in SPLITS:
        images = load_dataset(spec).images
        print(row(spec, measure(images.numpy(), args.check), args.floor), flush=True)  # noqa: T201
        if spec == "fashion-mnist:valid" and args.reencoded:
            again = measure(reencode(images[: args.reencoded], 256).numpy(), args.check)
            print(row(f"{spec} re-encoded ({args.reencoded})", again, args.floor))  # noqa: T201
    for root in args.suite:
        for kind in sorted(d for d in Path(root).iterdir() if d.is_dir() and suite_files(d)):
            for fit in FITS:
                files = suite_files(kind)
                x = np.stack([file_to_levels(f.read_bytes(), (1, 28, 28), 256, fit=fit) for f in files])
                print(row(f"{Path(root).name}/{kind.name} ({fit})", measure(x, args.check), args.floor), flush=True)  # noqa: T201


if __name__ == "__main__":
    main()
