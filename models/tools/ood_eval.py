"""``genserve eval-ood``: how well each outlier score separates in-distribution test images from
out-of-distribution sets, and whether the calibrated threshold keeps its false-positive rate.

For every score type of the model and every out-of-distribution set: AUROC, AUPRC (out-of-
distribution images as the positive class) and the false-positive rate at 95% true-positive rate;
for every calibrated score type the false-positive rate observed at its threshold on the
in-distribution test set, and the share of each out-of-distribution set it flags. Writes a JSON
report, a markdown table, ROC curves and score histograms (PNG).

Data specs are those of :func:`tools.data.load_dataset` (a named data set without a split means
its test split), plus synthetic sets shaped like the model's input, deterministic given ``seed``:

- ``noise:uniform[:N]`` (or ``noise``): N images (default 1,000) of i.i.d. uniform levels;
- ``constant[:N]``: N constant images (default: one per level), values evenly spaced over the levels;
- ``flip:SPEC``: the images of SPEC flipped upside down (vertically); ``hflip:SPEC``: mirrored;
- ``files:DIR``: every image file in DIR (sorted by name), each decoded and converted exactly as
  ``/score`` does with ``resize=true`` (:func:`models.image_convert.file_to_levels`), and judged as
  /score judges it: a file the model's colour check refuses (:mod:`models.scoring.colour`) counts
  as flagged whatever its score (AUROC is of the score alone);
- any spec with ``@N`` appended: a seeded random subset of N images (``fashion-mnist:test@2000``).

Every image of every set (arrays and files, in- and out-of-distribution) is also judged by the
model's peak and extent checks (:mod:`models.scoring.peak`, :mod:`models.scoring.extent`), as /score
judges it: the shares flagged and the false-positive rate count their refusals (``peak_refused``,
``extent_refused`` in the report; AUROC is of the score alone).

``--suite DIR`` adds ``files:DIR/KIND`` for every subfolder KIND of DIR (the real-upload suite of
``genserve build-upload-suite``), and the report gets a table per kind: AUROC and the share flagged at
the calibrated threshold, beside the false-positive rate observed on the in-distribution test set.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.image_convert import file_colour_fraction, file_to_levels
from models.scoring.colour import ColourCheck, colour_check_for
from models.scoring.extent import ExtentCheck, extent_check_for, extents
from models.scoring.peak import PeakCheck, peak_check_for, peak_levels
from models.scoring.scorer import Scorer, load_scorer
from models.tools.data import NAMED, ImageDataset, load_dataset
from models.tools.ood_report import markdown, plot_heatmaps, plot_hist, plot_roc
from models.tools.roc import auprc, auroc, fpr_at_tpr
from models.tools.score_sets import score_images

logger = logging.getLogger(__name__)

DEFAULT_NOISE = 1000


# ---- data sets -------------------------------------------------------------------------------------


def load_eval_set(
    spec: str,
    *,
    shape: tuple[int, int, int],
    levels: int,
    seed: int = 0,
    limit: int | None = None,
    colour_tolerance: int | None = None,
    fit: str = "pad",
) -> ImageDataset:
    """A data set for the evaluation: a ``load_dataset`` spec or a synthetic one (module docstring),
    optionally cut to ``limit`` images (a seeded random subset; ``SPEC@N`` sets it for one set). With
    ``colour_tolerance`` image files also get their colour fractions, as /score measures them; ``fit``:
    how image files of another aspect ratio are sized (/score's ``fit``, models/image_convert.py)."""
    if "@" in spec:
        whole, _, count = spec.rpartition("@")
        subset = load_eval_set(
            whole, shape=shape, levels=levels, seed=seed, limit=int(count), colour_tolerance=colour_tolerance, fit=fit
        )
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
        data = load_files(spec, shape=shape, levels=levels, colour_tolerance=colour_tolerance, fit=fit)
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
        labels = None if data.labels is None else data.labels[idx]
        colour = None if data.colour is None else data.colour[idx.numpy()]
        data = ImageDataset(data.images[idx], labels, data.classes, data.spec, colour)
    return data


def load_files(
    spec: str, *, shape: tuple[int, int, int], levels: int, colour_tolerance: int | None, fit: str
) -> ImageDataset:
    """``files:FOLDER``: every image file of FOLDER as /score reads it with resize=true and ``fit``, and
    with ``colour_tolerance`` each file's colour fraction."""
    paths = suite_files(Path(spec.partition(":")[2]))
    if not paths:
        raise ValueError(f"{spec}: no image files in {spec.partition(':')[2]}")
    arrays = [file_to_levels(p.read_bytes(), shape, levels, fit=fit) for p in paths]
    colour = None
    if colour_tolerance is not None:
        colour = np.array([file_colour_fraction(p.read_bytes(), colour_tolerance) for p in paths])
    return ImageDataset(torch.from_numpy(np.stack(arrays)), None, None, spec, colour)


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


def _in_report(
    s_in: dict[str, np.ndarray], names: list[str], cal_scores: dict[str, Any], refused: np.ndarray | None = None
) -> dict[str, Any]:
    """Per score type on the in-distribution set (scores (N,) each): mean, std and, where calibrated,
    the threshold and the false-positive rate observed at it (files ``refused`` (N,) by the colour
    check count as flagged, as /score flags them)."""
    in_report = {}
    for n in names:
        entry: dict[str, Any] = {"mean": float(s_in[n].mean()), "std": float(s_in[n].std())}
        if n in cal_scores:
            t = float(cal_scores[n]["threshold"])
            over = s_in[n] > t
            entry["threshold"] = t
            entry["observed_fpr_at_threshold"] = float((over if refused is None else over | refused).mean())
        in_report[n] = entry
    return in_report


def _out_report(
    s_in: dict[str, np.ndarray],
    s_out: dict[str, np.ndarray],
    names: list[str],
    cal_scores: dict[str, Any],
    refused: np.ndarray | None = None,
) -> dict[str, Any]:
    """Per score type on one out-of-distribution set: AUROC, AUPRC, FPR at 95% TPR, the mean score
    and, where calibrated, the share flagged at the threshold: as /score flags them, the score over
    its threshold or the file ``refused`` (N,) by the colour check (then also ``flagged_by_score``)."""
    per: dict[str, Any] = {}
    for n in names:
        m: dict[str, Any] = {
            "auroc": auroc(s_in[n], s_out[n]),
            "auprc": auprc(s_in[n], s_out[n]),
            "fpr_at_95_tpr": fpr_at_tpr(s_in[n], s_out[n], 0.95),
            "mean": float(s_out[n].mean()),
        }
        if n in cal_scores:
            over = s_out[n] > float(cal_scores[n]["threshold"])
            m["flagged_at_threshold"] = float((over if refused is None else over | refused).mean())
            if refused is not None:
                m["flagged_by_score"] = float(over.mean())
        per[n] = m
    return per


def refused_by_checks(
    colour: ColourCheck | None,
    peak: PeakCheck | None,
    data: ImageDataset,
    levels: int,
    extent: ExtentCheck | None = None,
) -> tuple[np.ndarray | None, dict[str, float]]:
    """(N,) bool: which of a set's images the model's checks refuse whatever their score (the colour
    check: files only; the peak and extent checks: every image), or None where none applies; and the
    share each check refuses (``colour_refused``, ``peak_refused``, ``extent_refused``)."""
    parts: dict[str, np.ndarray] = {}
    if colour is not None and data.colour is not None:
        parts["colour_refused"] = np.array([colour.crossed(float(f)) for f in data.colour], dtype=bool)
    if peak is not None:
        parts["peak_refused"] = np.array([peak.crossed(int(v)) for v in peak_levels(data.images.numpy(), levels)])
    if extent is not None:
        spans = extents(data.images.numpy(), levels, extent.level)
        parts["extent_refused"] = np.array([extent.crossed(int(v)) for v in spans], dtype=bool)
    if not parts:
        return None, {}
    return np.logical_or.reduce(list(parts.values())), {k: float(v.mean()) for k, v in parts.items()}


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
    checks = (colour_check_for(meta) if scorer.model.shape[0] == 1 else None, peak_check_for(meta))
    levels, extent = scorer.model.levels, extent_check_for(meta)
    in_refused, in_shares = refused_by_checks(*checks, in_data, levels, extent)
    in_report = _in_report(s_in, names, cal_scores, in_refused)
    outs: dict[str, Any] = {}
    raw_out: dict[str, dict[str, np.ndarray]] = {}
    for data in out_data:
        s_out = scores_of(data)
        raw_out[data.spec] = s_out
        refused, shares = refused_by_checks(*checks, data, levels, extent)
        outs[data.spec] = {"n": len(data), "scores": _out_report(s_in, s_out, names, cal_scores, refused), **shares}
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
        "in": {"spec": in_data.spec, "n": len(in_data), "scores": in_report, **in_shares},
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
    fit: str = "pad",
) -> dict[str, Any]:
    """Load, evaluate and write ``NAME.json``, ``NAME.md``, ``NAME-roc.png``, ``NAME-hist.png`` and
    for autoregressive models ``NAME-heatmaps.png`` (``examples`` images of each set)."""
    scorer, meta = load_scorer(model, device)
    meta["_folder"] = str(model)
    shape, levels = scorer.model.shape, scorer.model.levels
    check = colour_check_for(meta) if shape[0] == 1 else None
    tolerance = None if check is None else check.tolerance
    kw: dict[str, Any] = {"shape": shape, "levels": levels, "seed": seed, "colour_tolerance": tolerance, "fit": fit}
    in_data = load_eval_set(in_spec, limit=limit, **kw)
    suite_sets = suite_specs(suite) if suite else []
    outs = [load_eval_set(s, limit=limit, **kw) for s in out_specs]
    outs += [load_eval_set(s, **kw) for s in suite_sets]  # whole kinds
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
    report.update(suite={s: Path(s.partition(":")[2]).name for s in suite_sets}, fit=fit, command=command)
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
