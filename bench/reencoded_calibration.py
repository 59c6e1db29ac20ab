"""A gate for a pipeline that re-encodes its images: ``genserve calibrate --reencode`` calibrates on the
validation split re-encoded (a third each kept exact, saved as JPEG at a random quality 70..95,
upscaled 2x to 4x and saved as PNG or JPEG; models/tools/reencode.py), and this measures what that
costs. The served calibration against one made with the model's recorded calibration command plus
``--reencode`` (in a temporary copy; the shipped checkpoint is not touched), both judged on the
re-encoded test images of bench/reencoded_fpr.py (fixed encodings, not those of the calibration),
all 10,000 exact test images, MNIST and the real-upload suite.

    python bench/reencoded_calibration.py --model checkpoints/vae-fmnist --cache .cache/ood
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reencoded_fpr import VARIANTS, build

SUITE = Path(__file__).resolve().parents[1] / "data" / "upload-suite"


def evaluate(model: Path, files: Path, cache: str, report_dir: Path) -> dict:
    """eval-ood of ``model``: the exact test images in (all 10,000; arrays convert as their PNGs do), the
    re-encoded ones, MNIST and the suite out."""
    argv = ["genserve", "eval-ood", "--model", str(model), "--in", "fashion-mnist:test"]
    argv += [a for v in VARIANTS for a in ("--out", f"files:{files / v}")]
    argv += ["--out", "mnist@1000", "--suite", str(SUITE), "--scores", "dose", "--examples", "0"]
    argv += ["--cache", cache, "--report-dir", str(report_dir), "--no-progress"]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((report_dir / f"{model.name}.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint folder")
    p.add_argument("--images", type=int, default=300, help="re-encoded test images per kind")
    p.add_argument("--out", default="runs/reencoded", help="where the files are built")
    p.add_argument("--cache", default="runs/ood-cache", help="statistics cache")
    args = p.parse_args()
    out, model = Path(args.out), Path(args.model)
    build(out, args.images)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        rows["served"] = evaluate(model, out, args.cache, Path(tmp) / "served")
        copy = Path(tmp) / model.name
        shutil.copytree(model, copy)
        argv = shlex.split(json.loads((model / "model.json").read_text())["calibration"]["command"])
        argv[argv.index("--model") + 1] = str(copy)
        argv += ["--reencode"]
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rows["--reencode"] = evaluate(copy, out, args.cache, Path(tmp) / "mixed")
    suite = rows["served"]["suite"]  # spec -> kind
    keys = [*(f"files:{out / v}" for v in VARIANTS), "mnist@1000", *sorted(suite, key=lambda k: suite[k])]
    names = [*VARIANTS, "MNIST (1,000)", *(suite[k] for k in sorted(suite, key=lambda k: suite[k]))]
    print(f"| {model.name}, calibrated | exact test images (10,000) | " + " | ".join(names) + " |")  # noqa: T201
    print("| --- | --- |" + " --- |" * len(keys))  # noqa: T201
    for label, r in rows.items():
        cells = [f"{r['in']['scores']['dose']['observed_fpr_at_threshold']:.1%}"]
        cells += [f"{r['out'][k]['scores']['dose']['flagged_at_threshold']:.1%}" for k in keys]
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)  # noqa: T201


if __name__ == "__main__":
    main()
