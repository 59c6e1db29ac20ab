"""``genserve eval-classify``: classification by Bayes' rule with refusal, measured.

For a calibrated class-conditional model: on labelled in-distribution test data, the accuracy of
argmax_y p(y|x) (p(y) the training class frequencies), the share refused (the outlier test on p(x) =
sum_y p(x|y) p(y) at the calibrated threshold: the observed false-positive rate) and the accuracy on
the images kept; on each out-of-distribution set, the share refused. Writes a JSON report and a
markdown table. The model passes (K per image) are cached like ``eval-ood``'s, and ``calibrate``'s
cached validation passes are reused where the images match.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.scoring.classify import posterior_from
from models.scoring.coders import code_length_bits
from models.scoring.scorer import ModelOutputs, Scorer, load_scorer
from models.scoring.scores import DOSE, needs_code
from models.tools.ood_eval import load_eval_set
from models.tools.score_sets import model_outputs, score_images

logger = logging.getLogger(__name__)


def classify_set(
    scorer: Scorer,
    images: torch.Tensor,
    *,
    score_type: str,
    batch_size: int = 64,
    cache_dir: str | Path | None = None,
    show_progress: bool = True,
) -> dict[str, np.ndarray]:
    """Per image of (N, C, H, W): ``predicted`` class (N,), ``log_posterior`` (N, K), ``log_marginal``
    log p(x) in nats (N,) and ``score`` (N,) of ``score_type`` on p(x)."""
    got = model_outputs(scorer, images, None, batch_size=batch_size, cache_dir=cache_dir, show_progress=show_progress)
    assert scorer.prior is not None, "classification needs a class-conditional model"
    post = posterior_from(torch.from_numpy(got["class_log_likelihood"]).double(), scorer.prior.double())
    # the score from the scorer's own log p(x), exactly what calibrate and /score judge
    outputs = ModelOutputs(log_prob=torch.from_numpy(got["log_prob"]))
    if score_type == DOSE:  # the statistics pass over each image and its flip (cached per chunk)
        dose = score_images(
            scorer, images, names=[DOSE], batch_size=batch_size, cache_dir=cache_dir, show_progress=show_progress
        )
        score = torch.from_numpy(dose[DOSE])
    else:
        code_bits = code_length_bits(images, levels=scorer.model.levels) if needs_code([score_type]) else None
        score = scorer.scores_from([score_type], outputs, code_bits=code_bits)[score_type]
    return {
        "predicted": post.predicted.numpy(),
        "log_posterior": post.log_posterior.numpy(),
        "log_marginal": got["log_prob"].astype(np.float64),
        "score": score.numpy(),
    }


def _accuracy(pred: np.ndarray, labels: np.ndarray) -> float | None:
    return float((pred == labels).mean()) if len(labels) else None


def confidence(log_posterior: np.ndarray, correct: np.ndarray) -> dict[str, float | None]:
    """How sure the classifier is, and how right when sure: mean p(predicted|x), the share of images
    with p(predicted|x) > 0.99, and the accuracy on those."""
    p = np.exp(log_posterior.max(1))
    sure = p > 0.99
    return {
        "mean_probability": float(p.mean()),
        "share_above_0.99": float(sure.mean()),
        "accuracy_above_0.99": float(correct[sure].mean()) if sure.any() else None,
    }


def _check_model(
    model_folder: str | Path, scorer: Scorer, meta: dict[str, Any]
) -> tuple[int, torch.Tensor, dict[str, Any]]:
    """(K classes, the prior p(y) of shape (K,), the calibration); refuses a model that cannot classify."""
    k = scorer.model.n_classes
    if k is None or scorer.prior is None:
        raise ValueError(f"{model_folder}: classification needs a class-conditional model")
    cal = meta.get("calibration") or {}
    if not cal:
        raise ValueError(f"{model_folder}: not calibrated; run `genserve calibrate --model {model_folder}` first")
    return k, scorer.prior, cal


def _bits_per_dim(log_marginal: np.ndarray, dims: int) -> float:
    """Mean bits/dim of log p(x) in nats, shape (N,)."""
    return float(-log_marginal.mean() / (dims * np.log(2)))


def _in_distribution(
    scorer: Scorer, spec: str, *, k: int, classes: list[str], threshold: float, seed: int, limit: int | None, **kw: Any
) -> dict[str, Any]:
    """The report on labelled in-distribution data: accuracy, refusals, confidence, confusion (K, K)."""
    data = load_eval_set(spec, shape=scorer.model.shape, levels=scorer.model.levels, seed=seed, limit=limit)
    if data.labels is None:
        raise ValueError(f"{spec} has no labels; accuracy needs a labelled test set")
    labels = data.labels.numpy()
    got = classify_set(scorer, data.images, **kw)
    rejected = got["score"] > threshold
    pred = got["predicted"]
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels, pred), 1)
    return {
        "spec": spec,
        "n": len(data),
        "accuracy": _accuracy(pred, labels),
        "rejected": float(rejected.mean()),
        "accuracy_kept": _accuracy(pred[~rejected], labels[~rejected]),
        "per_class_accuracy": {c: _accuracy(pred[labels == i], labels[labels == i]) for i, c in enumerate(classes)},
        "mean_bits_per_dim": _bits_per_dim(got["log_marginal"], scorer.model.dims),
        "confidence": confidence(got["log_posterior"], pred == labels),
        "confusion": confusion.tolist(),
    }


def _out_of_distribution(
    scorer: Scorer, spec: str, *, k: int, threshold: float, seed: int, limit: int | None, **kw: Any
) -> dict[str, Any]:
    """The report on an out-of-distribution set: the share refused and what it is taken for."""
    o = load_eval_set(spec, shape=scorer.model.shape, levels=scorer.model.levels, seed=seed, limit=limit)
    g = classify_set(scorer, o.images, **kw)
    return {
        "n": len(o),
        "rejected": float((g["score"] > threshold).mean()),
        "mean_bits_per_dim": _bits_per_dim(g["log_marginal"], scorer.model.dims),
        "predicted_counts": np.bincount(g["predicted"], minlength=k).tolist(),
    }


def _write(result: dict[str, Any], report: str | Path) -> None:
    """The JSON report at ``report`` and its markdown table beside it (.md)."""
    path = Path(report)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown(result))
    logger.info("wrote %s and %s", path, path.with_suffix(".md"))


def run(
    model_folder: str | Path,
    in_spec: str,
    out_specs: list[str],
    *,
    report: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 64,
    seed: int = 0,
    limit: int | None = None,
    cache_dir: str | Path | None = None,
    command: str = "",
    show_progress: bool = True,
) -> dict[str, Any]:
    """Evaluate; returns the report and, with ``report`` (a path ending .json), writes it and a .md."""
    t0 = time.perf_counter()
    scorer, meta = load_scorer(model_folder, device)
    k, prior, cal = _check_model(model_folder, scorer, meta)
    score_type = str(cal["default_score"])
    threshold = float(cal["scores"][score_type]["threshold"])
    classes = list((meta.get("dataset") or {}).get("classes") or [str(i) for i in range(k)])
    kw: dict[str, Any] = {"score_type": score_type, "batch_size": batch_size, "cache_dir": cache_dir}
    kw["show_progress"] = show_progress
    common: dict[str, Any] = {"k": k, "threshold": threshold, "seed": seed, "limit": limit}
    in_result = _in_distribution(scorer, in_spec, classes=classes, **common, **kw)
    result: dict[str, Any] = {
        "model": str(model_folder),
        "classes": classes,
        "prior": [round(float(p), 6) for p in prior],
        "score_type": score_type,
        "threshold": threshold,
        "target_fpr": cal.get("target_fpr"),
        "calibration_data": cal.get("data"),
        "in": in_result,
        "out": {spec: _out_of_distribution(scorer, spec, **common, **kw) for spec in out_specs},
        "limit": limit,
        "seed": seed,
        "command": command,
    }
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if report is not None:
        _write(result, report)
    return result


def markdown(r: dict[str, Any]) -> str:
    """The report as a markdown table (one row per data set)."""
    i = r["in"]
    lines = [
        f"# Classification with refusal: {Path(r['model']).name}",
        "",
        f"Bayes' rule over {len(r['classes'])} classes with the training prior; refusal when the "
        f"`{r['score_type']}` score of p(x) exceeds the calibrated threshold {r['threshold']:.4f} "
        f"(target false-positive rate {r['target_fpr']}, calibrated on {r['calibration_data']}).",
        "",
        f"Command: `{r['command']}`",
        "",
        "| data | images | accuracy | refused | accuracy on kept | mean bits/dim of p(x) |",
        "|---|---|---|---|---|---|",
        f"| {i['spec']} | {i['n']} | {i['accuracy']:.4f} | {i['rejected']:.4f} | {i['accuracy_kept']:.4f} | "
        f"{i['mean_bits_per_dim']:.3f} |",
    ]
    for spec, o in r["out"].items():
        lines.append(
            f"| {spec} (out of distribution) | {o['n']} | - | {o['rejected']:.4f} | - | {o['mean_bits_per_dim']:.3f} |"
        )
    c = i["confidence"]
    lines += [
        "",
        f"Confidence on {i['spec']}: mean p(predicted|x) {c['mean_probability']:.4f}; "
        f"{c['share_above_0.99']:.2%} of the images have p > 0.99, and "
        + ("none" if c["accuracy_above_0.99"] is None else f"{c['accuracy_above_0.99']:.4f}")
        + " of those are right.",
    ]
    lines += ["", "Per-class accuracy:", "", "| class | accuracy |", "|---|---|"]
    lines += [f"| {c} | {a:.4f} |" for c, a in i["per_class_accuracy"].items() if a is not None]
    return "\n".join(lines) + "\n"
