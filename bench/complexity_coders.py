"""Which lossless coder should the complexity score subtract? AUROC per coder and set, and coder speed.

S(x) = -log2 p(x) - L(x) (Serrà et al. 2020) is only as good as L: this script recomputes the score
with several coders on the same model outputs (one model pass per image, cached like eval-ood's)
and prints AUROC (in-distribution test vs each set) and images per second of each coder. Every L
falls back to the raw image (D log2(levels) bits) where the coder expands it, as the shipped one does.

    python bench/complexity_coders.py --model checkpoints/pixelcnn-fmnist --limit 3000 \
        --out mnist --out noise:uniform --out constant --out flip:fashion-mnist:test
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.scoring.coders import png_code_bits, webp_code_bits
from models.scoring.scorer import load_scorer
from models.scoring.scores import NLL
from models.tools.ood_eval import auroc, load_eval_set
from models.tools.score_sets import score_images


def pillow_coder(fmt: str, **options: object) -> Callable[[torch.Tensor], np.ndarray]:
    def bits(x: torch.Tensor) -> np.ndarray:
        out = []
        for im in x[:, 0].numpy():
            buf = io.BytesIO()
            Image.fromarray(im).save(buf, format=fmt, **options)
            out.append(8.0 * buf.tell())
        return np.array(out)

    return bits


CODERS: dict[str, Callable[[torch.Tensor], np.ndarray]] = {
    "png (zlib 9, stream)": lambda x: png_code_bits(x).numpy(),
    "webp lossless m4 q100 (shipped)": lambda x: webp_code_bits(x).numpy(),
    "webp lossless m0 q0 (fastest)": pillow_coder("WEBP", lossless=True, quality=0, method=0),
    "webp lossless m6 q100 (slowest)": pillow_coder("WEBP", lossless=True, quality=100, method=6),
    "jpeg2000 reversible": pillow_coder("JPEG2000", irreversible=False),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--in", dest="in_spec", default="fashion-mnist:test")
    p.add_argument("--out", dest="out_specs", action="append", required=True)
    p.add_argument("--limit", type=int)
    p.add_argument("--cache", default="runs/ood-cache")
    args = p.parse_args()
    scorer, _ = load_scorer(args.model)
    shape, levels, dims = scorer.model.shape, scorer.model.levels, scorer.model.dims
    specs = [args.in_spec, *args.out_specs]
    sets = {s: load_eval_set(s, shape=shape, levels=levels, limit=args.limit) for s in specs}
    nll = {s: score_images(scorer, d.images, names=[NLL], cache_dir=args.cache)[NLL] for s, d in sets.items()}
    raw = dims * math.log2(levels)
    rows = []
    for name, coder in CODERS.items():
        t0 = time.perf_counter()
        code = {s: 1.0 + np.minimum(coder(d.images), raw) for s, d in sets.items()}
        rate = sum(len(d) for d in sets.values()) / (time.perf_counter() - t0)
        score = {s: nll[s] - code[s] / dims for s in specs}
        aurocs = {s: auroc(score[args.in_spec], score[s]) for s in args.out_specs}
        rows.append({"coder": name, "images_per_s": rate, "in_bits_per_dim": float(code[args.in_spec].mean() / dims),
                     "auroc": aurocs})  # fmt: skip
    aurocs_raw = {s: auroc(nll[args.in_spec], nll[s]) for s in args.out_specs}
    header = f"| coder | img/s | L, bits/dim | {' | '.join(args.out_specs)} |"
    print(header)  # noqa: T201 - the benchmark's output
    print("| --- " * (3 + len(args.out_specs)) + "|")  # noqa: T201
    print(f"| none (raw NLL) | - | - | {' | '.join(f'{aurocs_raw[s]:.4f}' for s in args.out_specs)} |")  # noqa: T201
    for r in rows:
        cells = " | ".join(f"{r['auroc'][s]:.4f}" for s in args.out_specs)
        print(f"| {r['coder']} | {r['images_per_s']:.0f} | {r['in_bits_per_dim']:.3f} | {cells} |")  # noqa: T201
    result = {"model": args.model, "in": args.in_spec, "limit": args.limit, "raw_nll": aurocs_raw, "coders": rows}
    print(json.dumps(result, indent=2))  # noqa: T201


if __name__ == "__main__":
    main()
