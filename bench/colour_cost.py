"""What the colour check adds to decoding an upload: for every file of the real-upload suite, the time
of what /score with resize=true did to it before the check (decode, convert to the model's 28x28
grayscale input: :func:`models.image_convert.file_to_levels`) against what it does now (the same,
with the colour measured on the way: decode, :func:`models.image_convert.to_model_array_and_colour`),
in one run. Prints per kind the median of each and their ratio, and how many files the default check
refuses.

    python bench/colour_cost.py --suite data/upload-suite --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from models.image_convert import colour_fraction, decode_file, file_to_levels, to_model_array_and_colour
from models.scoring.colour import ColourCheck
from models.tools.ood_eval import suite_files


def timed(fn: object, *args: object, repeats: int) -> float:
    """Median seconds of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def with_colour(data: bytes, tolerance: int) -> None:
    """What /score does to a file for a model with a colour check."""
    to_model_array_and_colour(decode_file(data), (1, 28, 28), tolerance)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="data/upload-suite")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    check = ColourCheck()
    print("| kind (files) | median pixels | before (ms) | with colour (ms) | ratio | refused for colour |")  # noqa: T201
    print("| --- | --- | --- | --- | --- | --- |")  # noqa: T201
    total = [0.0, 0.0]
    for kind in sorted(d for d in Path(args.suite).iterdir() if d.is_dir()):
        conv, col, pixels, coloured = [], [], [], 0
        for f in suite_files(kind):
            data = f.read_bytes()
            im = decode_file(data)  # decoded once, as /score's decoding leaves it
            pixels.append(im.width * im.height)
            conv.append(timed(file_to_levels, data, (1, 28, 28), 256, repeats=args.repeats))
            col.append(timed(with_colour, data, check.tolerance, repeats=args.repeats))
            coloured += check.crossed(colour_fraction(im, check.tolerance))
        total[0] += sum(conv)
        total[1] += sum(col)
        a, b = statistics.median(conv) * 1e3, statistics.median(col) * 1e3
        print(  # noqa: T201
            f"| {kind.name} ({len(conv)}) | {int(statistics.median(pixels))} | {a:.2f} | {b:.2f} | {b / a:.2f}x | "
            f"{coloured}/{len(conv)} |"
        )
    print(f"| all files, summed | | {total[0] * 1e3:.1f} | {total[1] * 1e3:.1f} | {total[1] / total[0]:.2f}x | |")  # noqa: T201


if __name__ == "__main__":
    main()
