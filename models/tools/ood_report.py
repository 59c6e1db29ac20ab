"""The eval-ood report as people read it: the markdown tables (per set, per kind of upload) and the
ROC, histogram and heatmap figures (matplotlib, from the ``tools`` extra)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.scoring.scorer import Scorer
from models.scoring.scores import NLL, RATIO
from models.tools.data import ImageDataset
from models.tools.roc import roc_curve


def _pct(v: float) -> str:
    return f"{100 * v:.2f}%"


def markdown(report: dict[str, Any], *, name: str) -> str:
    """The report as markdown tables (the default score marked with *)."""
    names, default = report["score_types"], report["default_score"]
    label = {n: f"**{n}** *" if n == default else n for n in names}
    lines = [f"### {name}: {report['in']['spec']} ({report['in']['n']} images) against each set", ""]
    if report.get("command"):
        lines += ["```sh", report["command"], "```", ""]
    lines += ["AUROC (out-of-distribution = positive; * = the model's default score):", ""]
    lines += ["| out-of-distribution set | n | " + " | ".join(label[n] for n in names) + " |"]
    lines += ["| --- | --- |" + " --- |" * len(names)]
    for spec, o in report["out"].items():
        lines += [f"| {spec} | {o['n']} | " + " | ".join(f"{o['scores'][n]['auroc']:.4f}" for n in names) + " |"]
    lines += ["", "All metrics:", ""]
    lines += [
        "| set | score | AUROC | AUPRC | FPR at 95% TPR | flagged at threshold |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for spec, o in report["out"].items():
        for n in names:
            m = o["scores"][n]
            flagged = _pct(m["flagged_at_threshold"]) if "flagged_at_threshold" in m else "-"
            cells = [spec, label[n], f"{m['auroc']:.4f}", f"{m['auprc']:.4f}", _pct(m["fpr_at_95_tpr"]), flagged]
            lines += ["| " + " | ".join(cells) + " |"]
    if report.get("suite"):
        lines += ["", *suite_table(report)]
    cal = report.get("calibration")
    lines += [""]
    if cal:
        lines += [
            f"False-positive rate at the calibrated threshold (target {_pct(cal['target_fpr'])}, calibrated on "
            f"{cal['data']}, {cal['n']} images), observed on {report['in']['spec']}:",
            "",
            "| score | threshold | observed FPR |",
            "| --- | --- | --- |",
        ]
        for n in names:
            e = report["in"]["scores"][n]
            if "threshold" in e:
                lines += [f"| {label[n]} | {e['threshold']:.4f} | {_pct(e['observed_fpr_at_threshold'])} |"]
    else:
        lines += ["The model is not calibrated (run `genserve calibrate`): no threshold to check."]
    return "\n".join(lines) + "\n"


def suite_table(report: dict[str, Any]) -> list[str]:
    """Markdown: per kind of uploaded file, per score type, AUROC / share flagged at the threshold."""
    names, default = report["score_types"], report["default_score"]
    label = {n: f"**{n}** *" if n == default else n for n in names}
    fpr = {n: report["in"]["scores"][n].get("observed_fpr_at_threshold") for n in names}
    head = "| kind (files) | " + " | ".join(label[n] for n in names) + " |"
    lines = [
        "Real-upload suite (each file decoded and converted as /score does with resize=true): AUROC of the score / "
        "share flagged as /score flags it (score over the calibrated threshold, or refused by the colour, peak or "
        "extent check where the model has one: shares of colour, of dim and of small files in brackets); last row: "
        "share of the in-distribution test images flagged.",
        "",
        head,
        "| --- |" + " --- |" * len(names),
    ]
    for spec, kind in report["suite"].items():
        o = report["out"][spec]
        cells = []
        for n in names:
            m = o["scores"][n]
            flagged = _pct(m["flagged_at_threshold"]) if "flagged_at_threshold" in m else "-"
            cells.append(f"{m['auroc']:.4f} / {flagged}")
        checks = (("colour_refused", "colour"), ("peak_refused", "dim"), ("extent_refused", "small"))
        shares = [f"{_pct(o[k])} {word}" for k, word in checks if k in o]
        refused = f" [{', '.join(shares)}]" if shares else ""
        lines += [f"| {kind} ({o['n']}){refused} | " + " | ".join(cells) + " |"]
    test = " | ".join("-" if fpr[n] is None else _pct(fpr[n]) for n in names)
    lines += [f"| {report['in']['spec']} ({report['in']['n']}), flagged | {test} |"]
    return lines


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roc(raw: dict[str, Any], report: dict[str, Any], path: Path, *, title: str) -> None:
    """One panel per out-of-distribution set, one ROC curve per score type."""
    plt = _pyplot()
    specs = list(raw["out"])
    fig, axes = plt.subplots(1, max(1, len(specs)), figsize=(3.6 * max(1, len(specs)), 3.8), squeeze=False)
    for ax, spec in zip(axes[0], specs, strict=False):
        for n in report["score_types"]:
            fpr, tpr, _ = roc_curve(raw["in"][n], raw["out"][spec][n])
            auc = report["out"][spec]["scores"][n]["auroc"]
            style = "-" if n == report["default_score"] else "--"
            ax.plot(fpr, tpr, style, label=f"{n} ({auc:.3f})")
        ax.plot([0, 1], [0, 1], ":", color="grey", linewidth=0.8)
        ax.set_title(spec, fontsize=9)
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{title}: ROC, {report['in']['spec']} vs each set (AUROC)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_hist(raw: dict[str, Any], report: dict[str, Any], path: Path, *, title: str) -> None:
    """Rows: score types; columns: out-of-distribution sets; in-distribution vs set, threshold dashed."""
    plt = _pyplot()
    names, specs = report["score_types"], list(raw["out"])
    fig, axes = plt.subplots(
        len(names), max(1, len(specs)), figsize=(3.4 * max(1, len(specs)), 2.4 * len(names)), squeeze=False
    )
    for i, n in enumerate(names):
        s_in = raw["in"][n]
        for j, spec in enumerate(specs):
            ax = axes[i][j]
            s_out = raw["out"][spec][n]
            both = np.concatenate([s_in, s_out])
            lo, hi = np.percentile(both, [0.5, 99.5])
            if hi <= lo:
                lo, hi = lo - 0.5, hi + 0.5
            bins = np.linspace(lo, hi, 60)
            for values, label in ((s_in, report["in"]["spec"]), (s_out, spec)):
                ax.hist(
                    np.clip(values, lo, hi), bins=bins, density=True, alpha=0.55, histtype="stepfilled", label=label
                )
            t = report["in"]["scores"][n].get("threshold")
            if t is not None and lo <= t <= hi:
                ax.axvline(t, color="k", linestyle="--", linewidth=0.9)
            ax.set_title(f"{n} | {spec}", fontsize=8)
            ax.tick_params(labelsize=7)
            if i == 0 and j == 0:
                ax.legend(fontsize=6)
    fig.suptitle(f"{title}: score histograms (bits/dim; dashed: calibrated threshold)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_heatmaps(scorer: Scorer, sets: list[ImageDataset], path: Path, *, n: int, title: str) -> None:
    """``n`` images spread over each set, with the per-pixel maps /score returns for ``heatmap: true``:
    per-pixel NLL (nats, 0 to C ln L as in the service) and, with a background model, the
    background-corrected map (red: the model finds the pixel harder than the background does)."""
    plt = _pyplot()
    names = [NLL, RATIO] if RATIO in scorer.score_types else [NLL]
    cols = n * (1 + len(names))
    fig, axes = plt.subplots(len(sets), cols, figsize=(0.9 * cols, 1.0 * len(sets) + 0.6), squeeze=False)
    c, _, _ = scorer.model.shape
    scale = c * math.log(scorer.model.levels)
    for r, data in enumerate(sets):
        idx = torch.linspace(0, len(data) - 1, min(n, len(data))).round().long()  # spread over the set
        x = data.images[idx].to(scorer.model.device)
        got = scorer.compute(x, None, names, heatmap=True)
        for i in range(min(n, len(x))):
            panels = [(x[i].float().mean(0).cpu(), "gray", 0.0, float(scorer.model.levels - 1))]
            panels.append((got.heatmaps[NLL][i].cpu(), "magma", 0.0, scale))
            if RATIO in names:
                panels.append((got.heatmaps[RATIO][i].cpu(), "RdBu_r", -scale / 2, scale / 2))
            for j, (img, cmap, lo, hi) in enumerate(panels):
                ax = axes[r][i * len(panels) + j]
                ax.imshow(img.numpy(), cmap=cmap, vmin=lo, vmax=hi)
                if r == 0:
                    ax.set_title(["image", "NLL", "NLL - bg"][j], fontsize=7)
        axes[r][0].set_ylabel(data.spec, fontsize=6, rotation=0, ha="right", va="center")
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{title}: per-pixel anomaly maps (heatmap: true)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
