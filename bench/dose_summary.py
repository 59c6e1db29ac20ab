"""Summarise ``genserve eval-ood`` reports (docs/ood/MODEL.json) for the default score: per model, the
AUROC and share flagged for every set and every kind of the real-upload suite, and the false-positive
rate observed on the in-distribution test images. Prints a markdown table (docs/ood.md quotes it). Where
the colour check refused files the share flagged by the score alone follows in brackets.

    python bench/dose_summary.py docs/ood/vae-fmnist.json docs/ood/pixelvae-fmnist.json ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reports", nargs="+", help="eval-ood JSON reports")
    p.add_argument("--score", help="score type to show (default: each report's default)")
    args = p.parse_args()
    reports = [json.loads(Path(r).read_text()) for r in args.reports]
    names = [Path(r).stem for r in args.reports]
    sets = list(dict.fromkeys(s for r in reports for s in r["out"]))
    label = {s: reports[0].get("suite", {}).get(s, s) for s in sets}
    print("| set | " + " | ".join(names) + " |")  # noqa: T201
    print("| --- |" + " --- |" * len(names))  # noqa: T201
    for s in sets:
        cells = []
        for r in reports:
            score = args.score or r["default_score"]
            m = (r["out"].get(s) or {}).get("scores", {}).get(score)
            if m is None:
                cells.append("-")
                continue
            flagged, by_score = m.get("flagged_at_threshold"), m.get("flagged_by_score")
            cell = f"{m['auroc']:.4f} / {'-' if flagged is None else f'{100 * flagged:.1f}%'}"
            if by_score is not None and by_score != flagged:  # the colour check refused some files
                cell += f" (score alone {100 * by_score:.1f}%)"
            cells.append(cell)
        n = next(r["out"][s]["n"] for r in reports if s in r["out"])
        print(f"| {label[s]} ({n}) | " + " | ".join(cells) + " |")  # noqa: T201
    cells = []
    for r in reports:
        e = r["in"]["scores"][args.score or r["default_score"]]
        cells.append(f"{100 * e['observed_fpr_at_threshold']:.2f}%" if "observed_fpr_at_threshold" in e else "-")
    print(f"| test FPR at threshold ({reports[0]['in']['spec']}) | " + " | ".join(cells) + " |")  # noqa: T201


if __name__ == "__main__":
    main()
