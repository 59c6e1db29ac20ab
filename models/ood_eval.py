"""``genserve eval-ood``: how well each outlier score separates in-distribution test images from
out-of-distribution sets, and whether the calibrated threshold keeps its false-positive rate.

For every score type of the model and every out-of-distribution set: AUROC, AUPRC (out-of-
distribution images as the positive class) and the false-positive rate at 95% true-positive rate;
for every calibrated score type the false-positive rate observed at its threshold on the
in-distribution test set, and the share of each out-of-distribution set it flags. Writes a JSON
report, a markdown table, ROC curves and score histograms (PNG).

Data specs are those of :func:`models.data.load_dataset` (a named data set without a split means
its test split), plus synthetic sets shaped like the model's input, deterministic given ``seed``:

- ``noise:uniform[:N]`` (or ``noise``): N images (default 1,000) of i.i.d. uniform levels;
- ``constant[:N]``: N constant images (default: one per level), values evenly spaced over the levels;
- ``flip:SPEC``: the images of SPEC flipped upside down (vertically); ``hflip:SPEC``: mirrored;
- ``files:DIR``: every image file in DIR (sorted by name), each decoded and converted exactly as
  ``/score`` does with ``resize=true`` (:func:`models.image_convert.file_to_levels`);
- any spec with ``@N`` appended: a seeded random subset of N images (``fashion-mnist:test@2000``).

``--suite DIR`` adds ``files:DIR/KIND`` for every subfolder KIND of DIR (the real-upload suite of
``genserve build-upload-suite``), and the report gets a table per kind: AUROC and the share flagged at
the calibrated threshold, beside the false-positive rate observed on the in-distribution test set.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.data import NAMED, ImageDataset, load_dataset
from models.image_convert import file_to_levels
from models.outliers import NLL, RATIO, Scorer, load_scorer, score_images

logger = logging.getLogger(__name__)

DEFAULT_NOISE = 1000


# ---- data sets -------------------------------------------------------------------------------------


def load_eval_set(
    spec: str, *, shape: tuple[int, int, int], levels: int, seed: int = 0, limit: int | None = None
) -> ImageDataset:
    """A data set for the evaluation: a ``load_dataset`` spec or a synthetic one (module docstring),
    optionally cut to ``limit`` images (a seeded random subset; ``SPEC@N`` sets it for one set)."""
    if "@" in spec:
        whole, _, count = spec.rpartition("@")
        subset = load_eval_set(whole, shape=shape, levels=levels, seed=seed, limit=int(count))
        subset.spec = spec
        return subset
    kind, _, rest = spec.partition(":")
    gen = torch.Generator().manual_seed(seed)
    if kind == "noise":
        dist, _, count = rest.partition(":")
        if dist not in ("", "uniform"):
            raise ValueError(f"unknown noise '{dist}' in '{spec}': use noise:uniform[:N]")
        n = int(count) if count else DEFAULT_NOISE
        data = ImageDataset(torch.randint(0, levels, (n, *shape), generator=gen).to(_dtype(levels)), None, None, spec)
    elif kind == "constant":
        n = int(rest) if rest else levels
        values = torch.linspace(0, levels - 1, n).round().to(_dtype(levels))
        images = values.view(n, 1, 1, 1).expand(n, *shape).contiguous()
        data = ImageDataset(images, None, None, spec)
    elif kind == "files":
        paths = suite_files(Path(rest))
        if not paths:
            raise ValueError(f"{spec}: no image files in {rest}")
        arrays = [file_to_levels(p.read_bytes(), shape, levels) for p in paths]
        data = ImageDataset(torch.from_numpy(np.stack(arrays)), None, None, spec)
    elif kind in ("flip", "hflip"):
        if not rest:
            raise ValueError(f"{kind} needs a data set: {kind}:SPEC, e.g. {kind}:fashion-mnist:test")
        base = load_eval_set(rest, shape=shape, levels=levels, seed=seed)
        axis = 2 if kind == "flip" else 3  # upside down, or mirrored left to right
        data = ImageDataset(base.images.flip(axis).contiguous(), base.labels, base.classes, spec)
    else:
        data = load_dataset(f"{spec}:test" if kind in NAMED and not rest else spec)
        data.spec = spec
    if data.shape != shape:
        raise ValueError(f"{spec} holds {data.shape} images; the model takes {shape}")
    if limit is not None and len(data) > limit:
        idx = torch.randperm(len(data), generator=gen)[:limit].sort().values
        data = ImageDataset(
            data.images[idx], None if data.labels is None else data.labels[idx], data.classes, data.spec
        )
    return data


SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm")


def suite_files(folder: Path) -> list[Path]:
    """The image files of a suite folder, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)


def suite_specs(suite: str | Path) -> list[str]:
    """``files:SUITE/KIND`` for every subfolder KIND of the suite that holds image files, sorted."""
    root = Path(suite)
    if not root.is_dir():
        raise ValueError(f"no upload suite at {root}: build it with `genserve build-upload-suite --out {root}`")
    return [f"files:{d}" for d in sorted(root.iterdir()) if d.is_dir() and suite_files(d)]


def _dtype(levels: int) -> torch.dtype:
    return torch.uint8 if levels <= 256 else torch.int64


# ---- metrics (out-of-distribution = positive class, higher score = more anomalous) -------------------


def _curve(scores_in: np.ndarray, scores_out: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) over every distinct threshold, flagging score >= threshold, from
    (0, 0) to (1, 1)."""
    s = np.concatenate([scores_in, scores_out]).astype(np.float64)
    y = np.concatenate([np.zeros(len(scores_in)), np.ones(len(scores_out))])
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # last index of each group of equal scores
    tps = np.cumsum(y)[last]
    fps = last + 1 - tps
    fpr = np.r_[0.0, fps / max(1, len(scores_in))]
    tpr = np.r_[0.0, tps / max(1, len(scores_out))]
    return fpr, tpr, np.r_[np.inf, s[last]]


def auroc(scores_in: np.ndarray, scores_out: np.ndarray) -> float:
    """P(score_out > score_in) + P(tie)/2: the area under the ROC curve (trapezoids)."""
    fpr, tpr, _ = _curve(scores_in, scores_out)
    return float(np.trapezoid(tpr, fpr))


def auprc(scores_in: np.ndarray, scores_out: np.ndarray) -> float:
    """Average precision, out-of-distribution as the positive class: sum_i (R_i - R_{i-1}) P_i."""
    fpr, tpr, _ = _curve(scores_in, scores_out)
    tp = tpr[1:] * len(scores_out)
    fp = fpr[1:] * len(scores_in)
    precision = tp / np.maximum(tp + fp, 1e-12)
    return float(np.sum(np.diff(tpr) * precision))


def fpr_at_tpr(scores_in: np.ndarray, scores_out: np.ndarray, tpr_target: float = 0.95) -> float:
    """The lowest false-positive rate of any threshold that flags at least ``tpr_target`` of the
    out-of-distribution images."""
    fpr, tpr, _ = _curve(scores_in, scores_out)
    return float(fpr[np.argmax(tpr >= tpr_target - 1e-12)])


# ---- the evaluation --------------------------------------------------------------------------------


def evaluate_ood(
    scorer: Scorer,
    meta: dict[str, Any],
    in_data: ImageDataset,
    out_data: list[ImageDataset],
    *,
    batch_size: int = 128,
    cache_dir: str | Path | None = None,
    show_progress: bool = True,
    score_types: list[str] | None = None,
) -> dict[str, Any]:
    """The report (a JSON-able dict) and, under ``"_scores"``, the raw scores for plotting.
    ``score_types``: the score types to evaluate (default: all the model offers)."""
    t0 = time.perf_counter()
    names = score_types or scorer.score_types
    scorer.check(names)
    calibration = meta.get("calibration") or {}
    cal_scores = calibration.get("scores") or {}

    def scores_of(data: ImageDataset) -> dict[str, np.ndarray]:
        logger.info("scoring %s (%d images)", data.spec, len(data))
        return score_images(
            scorer, data.images, names=names, batch_size=batch_size, cache_dir=cache_dir, show_progress=show_progress
        )

    s_in = scores_of(in_data)
    in_report = {}
    for n in names:
        entry: dict[str, Any] = {"mean": float(s_in[n].mean()), "std": float(s_in[n].std())}
        if n in cal_scores:
            t = float(cal_scores[n]["threshold"])
            entry["threshold"] = t
            entry["observed_fpr_at_threshold"] = float((s_in[n] > t).mean())
        in_report[n] = entry
    outs: dict[str, Any] = {}
    raw_out: dict[str, dict[str, np.ndarray]] = {}
    for data in out_data:
        s_out = scores_of(data)
        raw_out[data.spec] = s_out
        per: dict[str, Any] = {}
        for n in names:
            m: dict[str, Any] = {
                "auroc": auroc(s_in[n], s_out[n]),
                "auprc": auprc(s_in[n], s_out[n]),
                "fpr_at_95_tpr": fpr_at_tpr(s_in[n], s_out[n], 0.95),
                "mean": float(s_out[n].mean()),
            }
            if n in cal_scores:
                m["flagged_at_threshold"] = float((s_out[n] > float(cal_scores[n]["threshold"])).mean())
            per[n] = m
        outs[data.spec] = {"n": len(data), "scores": per}
    return {
        "model": meta.get("_folder", ""),
        "sha256": meta["weights"]["sha256"],
        "background": scorer.background is not None,
        "score_types": names,
        "default_score": calibration.get("default_score") or scorer.recommended,
        "vae_score_k": scorer.vae_score_k if scorer.model.kind == "vae" else None,
        "calibration": None
        if not calibration
        else {k: calibration.get(k) for k in ("target_fpr", "data", "n", "default_score")},
        "in": {"spec": in_data.spec, "n": len(in_data), "scores": in_report},
        "out": outs,
        "seconds": round(time.perf_counter() - t0, 1),
        "_scores": {"in": s_in, "out": raw_out},
    }


def run(
    model: str | Path,
    in_spec: str,
    out_specs: list[str],
    *,
    report_dir: str | Path,
    name: str | None = None,
    device: str = "cpu",
    batch_size: int = 128,
    seed: int = 0,
    limit: int | None = None,
    cache_dir: str | Path | None = None,
    command: str = "",
    show_progress: bool = True,
    examples: int = 4,
    suite: str | Path | None = None,
    score_types: list[str] | None = None,
) -> dict[str, Any]:
    """Load, evaluate and write ``NAME.json``, ``NAME.md``, ``NAME-roc.png``, ``NAME-hist.png`` and
    for autoregressive models ``NAME-heatmaps.png`` (``examples`` images of each set)."""
    scorer, meta = load_scorer(model, device)
    meta["_folder"] = str(model)
    shape, levels = scorer.model.shape, scorer.model.levels
    in_data = load_eval_set(in_spec, shape=shape, levels=levels, seed=seed, limit=limit)
    suite_sets = suite_specs(suite) if suite else []
    outs = [load_eval_set(s, shape=shape, levels=levels, seed=seed, limit=limit) for s in out_specs]
    outs += [load_eval_set(s, shape=shape, levels=levels, seed=seed) for s in suite_sets]  # whole kinds
    report = evaluate_ood(
        scorer,
        meta,
        in_data,
        outs,
        batch_size=batch_size,
        cache_dir=cache_dir,
        show_progress=show_progress,
        score_types=score_types,
    )
    report["suite"] = {s: Path(s.partition(":")[2]).name for s in suite_sets}
    report["command"] = command
    raw = report.pop("_scores")
    name = name or Path(model).name
    out_dir = Path(report_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    import json

    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(markdown(report, name=name))
    # the suite's kinds are in the markdown table; the plots keep to the synthetic and named sets
    plotted = {"in": raw["in"], "out": {k: v for k, v in raw["out"].items() if k not in report["suite"]}}
    plot_roc(plotted, report, out_dir / f"{name}-roc.png", title=name)
    plot_hist(plotted, report, out_dir / f"{name}-hist.png", title=name)
    # p(x) = sum_y p(x|y) p(y) of a class-conditional model has no per-pixel terms: no heatmaps
    if examples and scorer.per_pixel and scorer.model.n_classes is None:
        plot_heatmaps(scorer, [in_data, *outs], out_dir / f"{name}-heatmaps.png", n=examples, title=name)
    return report


# ---- output ----------------------------------------------------------------------------------------


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
        "Real-upload suite (each file decoded and converted as /score does with resize=true): AUROC / share "
        "flagged at the calibrated threshold; last row: share of the in-distribution test images flagged.",
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
        lines += [f"| {kind} ({o['n']}) | " + " | ".join(cells) + " |"]
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
            fpr, tpr, _ = _curve(raw["in"][n], raw["out"][spec][n])
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
