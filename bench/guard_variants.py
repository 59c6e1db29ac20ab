"""Ways to give the complexity score a likelihood floor, compared on the same model outputs.

``complexity`` loses to raw likelihood on uniform noise: noise is incompressible, so subtracting its
code length leaves a moderate score. This compares the shipped ``complexity_guarded`` (a hinge on
the NLL above the largest calibration NLL) with alternatives, by AUROC against each set and the
share flagged at each variant's own 1% threshold on the validation split.

    GENSERVE_DATA_DIR=../shared/data python bench/guard_variants.py --model checkpoints/pixelcnn-fmnist

Uses the score cache of ``genserve eval-ood`` (``runs/ood-cache``), so after an eval-ood run it costs
no model pass.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import numpy as np

from models.scoring.scorer import load_scorer
from models.scoring.scores import COMPLEXITY, GUARD_WEIGHT, NLL
from models.tools.data import load_dataset
from models.tools.ood_eval import auroc, load_eval_set
from models.tools.score_sets import score_images

Scores = dict[str, np.ndarray]


def variants(val: Scores) -> dict[str, Callable[[Scores], np.ndarray]]:
    """Each variant maps a set's {nll, complexity} (bits/dim) to one score, using only validation data."""

    def robust(v: np.ndarray) -> tuple[float, float]:
        q25, q50, q75 = np.quantile(v, [0.25, 0.5, 0.75])
        return float(q50), float(q75 - q25)

    (mc, ic), (mn, i_n) = robust(val[COMPLEXITY]), robust(val[NLL])

    def hinge(q: float) -> Callable[[Scores], np.ndarray]:
        cap = float(np.quantile(val[NLL], q))
        return lambda s: s[COMPLEXITY] + GUARD_WEIGHT * np.maximum(0.0, s[NLL] - cap)

    return {
        "complexity": lambda s: s[COMPLEXITY],
        "nll": lambda s: s[NLL],
        "hinge at max calibration NLL (shipped complexity_guarded)": hinge(1.0),
        "hinge at 99.9th percentile": hinge(0.999),
        "hinge at 99th percentile": hinge(0.99),
        "max of median/IQR-standardised scores": lambda s: np.maximum((s[COMPLEXITY] - mc) / ic, (s[NLL] - mn) / i_n),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--in", dest="in_spec", default="fashion-mnist:test")
    ap.add_argument("--out", dest="outs", action="append")
    ap.add_argument("--cache", default="runs/ood-cache")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    outs = args.outs or ["mnist", "noise:uniform", "constant", "flip:fashion-mnist:test"]
    scorer, meta = load_scorer(args.model)
    kw = {"names": [NLL, COMPLEXITY], "cache_dir": args.cache, "show_progress": False}
    valid = f"{meta['dataset']['name']}:valid"
    val = score_images(scorer, load_dataset(valid).images, **kw)
    sets = {
        s: score_images(scorer, load_eval_set(s, shape=scorer.model.shape, levels=256).images, **kw)
        for s in [args.in_spec, *outs]
    }
    rows: list[dict[str, Any]] = []
    for name, f in variants(val).items():
        threshold = float(np.quantile(f(val), 0.99))
        s_in = f(sets[args.in_spec])
        rows.append(
            {
                "variant": name,
                "test_fpr_at_threshold": float((s_in > threshold).mean()),
                "auroc": {o: auroc(s_in, f(sets[o])) for o in outs},
                "flagged": {o: float((f(sets[o]) > threshold).mean()) for o in outs},
            }
        )
    extremes = {
        "validation_max_nll": float(val[NLL].max()),
        **{f"{o}_min_nll": float(sets[o][NLL].min()) for o in outs},
    }
    if args.json:
        print(json.dumps({"model": args.model, "extremes": extremes, "variants": rows}, indent=2))  # noqa: T201
        return
    print(f"{args.model}: NLL extremes (bits/dim) " + ", ".join(f"{k} {v:.3f}" for k, v in extremes.items()))  # noqa: T201
    print(f"{'variant':58s} {'test FPR':>8s} " + " ".join(f"{o[:14]:>14s}" for o in outs) + "   (AUROC / flagged)")  # noqa: T201
    for r in rows:
        cells = " ".join(f"{r['auroc'][o]:.4f}/{r['flagged'][o]:.3f}" for o in outs)
        print(f"{r['variant']:58s} {r['test_fpr_at_threshold']:8.4f} {cells}")  # noqa: T201


if __name__ == "__main__":
    main()
