"""Score types as the service sees them: what /score computes for a batch, and how it is judged.

The scores themselves live in :mod:`models.outliers`: each worker holds a
:class:`~models.outliers.Scorer` built from its model folder (the model, plus the background model
in ``<folder>/background/`` on the same device where there is one), and :func:`compute` runs it.
Which score types a model offers follows from its folder alone (:func:`score_types_for`), so
``/models`` and request validation need no loaded weights.

How a score is judged comes from the checkpoint's ``calibration`` (written by ``genserve
calibrate``): ``{"default_score": name, "scores": {name: {"threshold": t, "quantiles": [q_0..q_100]}}}``.
``is_outlier = score > threshold``; the percentile is where the score falls among the quantiles.
An uncalibrated model defaults to the score type the evaluation recommends, without a threshold.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from models.base import DensityModel
from models.checkpoint import META
from models.classify import posterior_from
from models.dose import explain
from models.outliers import (
    BACKGROUND,
    SCORE_TYPES,
    Scorer,
    available_score_types,
    calibrated_dose,
    recommended_score,
)

__all__ = ["SCORE_TYPES", "Calibration", "calibration_for", "compute", "default_score_type", "percentile"]


def has_background(folder: Path) -> bool:
    return (folder / BACKGROUND / META).is_file()


def score_types_for(folder: Path, meta: dict[str, Any] | None = None) -> list[str]:
    """The score types a model folder offers (``likelihood_ratio`` needs a background model, ``dose``
    a calibration that fitted it)."""
    return available_score_types(has_background=has_background(folder), has_dose=has_dose(meta or {}))


def has_dose(meta: dict[str, Any]) -> bool:
    return bool((meta.get("calibration") or {}).get("dose"))


def explanation(meta: dict[str, Any], out: dict[str, Tensor], i: int, threshold: float | None) -> dict[str, Any] | None:
    """The ``explanation`` of image i's dose score (None for other score types)."""
    if "dose_values" not in out:
        return None
    fit = calibrated_dose(meta)
    assert fit is not None
    values = dict(zip(fit.statistics, out["dose_values"][i].tolist(), strict=True))
    return explain(values, out["dose_log10_p"][i].numpy(), out["dose_contributions"][i].numpy(), fit, threshold)


def compute(scorer: Scorer, x: Tensor, y: Tensor | None, *, score_type: str, heatmap: bool) -> dict[str, Tensor]:
    """Per-image outputs for a batch: ``log_prob`` (B,) nats (the estimate the score used), ``score``
    (B,), and with ``heatmap`` ``heatmap`` (B, H, W): the per-pixel anomaly in nats (-log p(x_i | x_<i)
    summed over channels; for ``likelihood_ratio`` minus the background model's). A class-conditional
    model given no labels scores p(x) = sum_y p(x|y) p(y) and adds ``class_log_likelihood`` (B, K)
    log p(x|y) and ``class_log_posterior`` (B, K) log p(y|x) by Bayes' rule with the training prior."""
    b = x.shape[0]
    got = scorer.compute(x, y, [score_type], heatmap=heatmap)
    out = {"log_prob": got.log_prob[score_type], "score": got.scores[score_type]}
    if heatmap:
        out["heatmap"] = got.heatmaps[score_type]
    if got.dose_values is not None:  # the dose score's statistics, for the explanation
        assert got.dose_log10_p is not None and got.dose_contributions is not None
        out["dose_values"] = got.dose_values
        out["dose_log10_p"] = got.dose_log10_p
        out["dose_contributions"] = got.dose_contributions
    if got.class_log_likelihood is not None:
        assert scorer.prior is not None
        out["class_log_likelihood"] = got.class_log_likelihood
        log_lik, prior = got.class_log_likelihood.double(), scorer.prior.double()  # float64: sums to 1 tightly
        out["class_log_posterior"] = posterior_from(log_lik, prior).log_posterior
    for key, value in out.items():
        assert value.shape[0] == b, f"score '{score_type}' gave {key} of shape {tuple(value.shape)} for {b} images"
    return out


def heatmap_scale_nats(model: DensityModel) -> float:
    """The per-pixel NLL drawn as 255 in heatmaps: C * ln(levels), the cost of a uniform guess."""
    return model.shape[0] * math.log(model.levels)


@dataclass(frozen=True)
class Calibration:
    """How to judge one score type for one model; None where the checkpoint has no calibration."""

    threshold: float | None = None
    quantiles: tuple[float, ...] | None = None

    def is_outlier(self, score: float) -> bool | None:
        return None if self.threshold is None else score > self.threshold

    def percentile(self, score: float) -> float | None:
        return None if self.quantiles is None else percentile(score, self.quantiles)


def default_score_type(meta: dict[str, Any], *, background: bool = False) -> str:
    """The calibrated default, else the recommended score for a model with (or without) a background."""
    return str((meta.get("calibration") or {}).get("default_score") or recommended_score(has_background=background))


def calibration_for(meta: dict[str, Any], score_type: str) -> Calibration:
    entry = ((meta.get("calibration") or {}).get("scores") or {}).get(score_type)
    if not entry:
        return Calibration()
    threshold = entry.get("threshold")
    quantiles = entry.get("quantiles")
    return Calibration(
        threshold=None if threshold is None else float(threshold),
        quantiles=None if not quantiles else tuple(sorted(float(q) for q in quantiles)),
    )


def percentile(score: float, quantiles: tuple[float, ...]) -> float:
    """Where ``score`` falls among evenly spaced quantiles q_0..q_K (K=100: percentiles), in [0, 100].

    Linear between neighbouring quantiles; below q_0 is 0 and above q_K is 100.
    """
    k = len(quantiles) - 1
    if k < 1 or score <= quantiles[0]:
        return 0.0
    if score >= quantiles[-1]:
        return 100.0
    i = bisect.bisect_right(quantiles, score)  # quantiles[i-1] <= score < quantiles[i]
    lo, hi = quantiles[i - 1], quantiles[i]
    frac = 0.0 if hi == lo else (score - lo) / (hi - lo)
    return 100.0 * (i - 1 + frac) / k
