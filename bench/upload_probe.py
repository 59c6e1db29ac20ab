"""Held-out probes of the outlier gate: kinds of upload the real-upload suite does not hold, made from
installed files and never used to design or calibrate anything. Builds them into ``--out`` (not
committed; deterministic), then prints, per model and kind, the share flagged as /score flags it with
resize=true (the default score over its threshold, or refused by the colour check) and, in brackets,
by the score alone.

Kinds: ``symbolic`` (60 monochrome Adwaita UI glyphs, transparent background), ``glyphs-black`` and
``glyphs-white`` (39 letters, digits and signs in DejaVu Sans Bold, white on black and black on white),
``white-silhouettes`` and ``black-silhouettes`` (the suite's transparent icons, logos and emoji with
every opaque pixel white, or black), ``gray-suite`` (the suite's icons, emoji, logos and photos
converted to gray, alpha kept: the colour check cannot see them).

    python bench/upload_probe.py --out /tmp/upload-probe --model checkpoints/pixelcnn-fmnist ...
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.scoring.colour import colour_check_for
from models.scoring.scorer import load_scorer
from models.tools.ood_eval import load_eval_set
from models.tools.score_sets import score_images

SUITE = Path(__file__).resolve().parents[1] / "data" / "upload-suite"
ICONS = Path("/usr/share/icons/Adwaita")
FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")
CHARS = "ABCDEFGHJKMNPQRSTUVWXYZ0123456789&?#@%$"


def symbolic(out: Path) -> None:
    glyphs = sorted(ICONS.glob("*/*/*symbolic*.png"))
    for p in random.Random(0).sample(glyphs, min(60, len(glyphs))):
        Image.open(p).save(out / f"{p.parent.parent.name}-{p.name}")


def glyphs(out_black: Path, out_white: Path) -> None:
    font = ImageFont.truetype(str(FONT), 40)
    for i, ch in enumerate(CHARS):
        for bg, fg, out in ((0, 255, out_black), (255, 0, out_white)):
            im = Image.new("L", (48, 48), bg)
            ImageDraw.Draw(im).text((24, 24), ch, fill=fg, font=font, anchor="mm")
            im.save(out / f"{i:02d}.png")


def silhouettes_and_gray(white: Path, black: Path, gray: Path) -> None:
    for kind in ("icons-large", "icons-small", "logos", "emoji", "photos"):
        for p in sorted((SUITE / kind).iterdir()):
            im = Image.open(p)
            im.load()
            if im.mode in ("RGBA", "LA", "PA", "P"):
                rgba = np.asarray(im.convert("RGBA"))
                alpha = rgba[..., 3]
                luma = np.asarray(Image.fromarray(rgba).convert("L"))
                Image.fromarray(np.stack([luma, alpha], axis=-1), "LA").save(gray / f"{kind}-{p.stem}.png")
                if kind != "photos" and (alpha < 250).mean() >= 0.2:  # a shape on a transparent background
                    for value, out in ((255, white), (0, black)):
                        shape = np.zeros((*alpha.shape, 4), np.uint8)
                        shape[..., :3], shape[..., 3] = value, alpha
                        Image.fromarray(shape, "RGBA").save(out / f"{kind}-{p.stem}.png")
            else:
                im.convert("L").save(gray / f"{kind}-{p.stem}.png")


def build(out: Path) -> list[Path]:
    kinds = ["symbolic", "glyphs-black", "glyphs-white", "white-silhouettes", "black-silhouettes", "gray-suite"]
    dirs = {k: out / k for k in kinds}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
        for f in d.iterdir():
            f.unlink()
    symbolic(dirs["symbolic"])
    glyphs(dirs["glyphs-black"], dirs["glyphs-white"])
    silhouettes_and_gray(dirs["white-silhouettes"], dirs["black-silhouettes"], dirs["gray-suite"])
    return list(dirs.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/upload-probe", help="where the probe files are built")
    p.add_argument("--model", action="append", required=True, help="checkpoint folder (repeatable)")
    p.add_argument("--cache", default="runs/ood-cache", help="statistics cache ('' for none)")
    args = p.parse_args()
    dirs = build(Path(args.out))
    print("| model | " + " | ".join(f"{d.name} ({len(list(d.iterdir()))})" for d in dirs) + " |")  # noqa: T201
    print("| --- |" + " --- |" * len(dirs))  # noqa: T201
    for folder in args.model:
        scorer, meta = load_scorer(folder)
        check = colour_check_for(meta) if scorer.model.shape[0] == 1 else None
        threshold = meta["calibration"]["scores"][meta["calibration"]["default_score"]]["threshold"]
        cells = []
        for d in dirs:
            data = load_eval_set(
                f"files:{d}",
                shape=scorer.model.shape,
                levels=scorer.model.levels,
                colour_tolerance=None if check is None else check.tolerance,
            )
            names = [meta["calibration"]["default_score"]]
            s = score_images(scorer, data.images, names=names, cache_dir=args.cache or None, show_progress=False)
            over = s[names[0]] > threshold
            flagged = over if check is None or data.colour is None else over | (data.colour > check.max_fraction)
            cells.append(f"{flagged.mean():.1%} ({over.mean():.1%})")
        print(f"| {Path(folder).name} | " + " | ".join(cells) + " |", flush=True)  # noqa: T201


if __name__ == "__main__":
    main()
