"""Calibration: the threshold and quantiles that judge a score, and reading them back.

A score is calibrated on held-out in-distribution images (never the test set): the threshold is
the conformal order statistic, the k-th smallest of n scores with k = ceil((n + 1)(1 - fpr)), so a
new in-distribution image lies above it with probability at most fpr, and about fpr for large n.
The checkpoint's ``calibration`` entry (written by ``genserve calibrate``) holds ``{"default_score":
name, "scores": {name: {"threshold": t, "quantiles": [q_0..q_100]}}}``; ``is_outlier = score >
threshold`` and the percentile is where the score falls among the quantiles.
"""

from __future__ import annotations

import bisect
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.scoring.scores import recommended_score

logger = logging.getLogger(__name__)

DEFAULT_FPR = 0.01
N_QUANTILES = 100  # calibration stores q_0 .. q_100 (percentiles)


def conformal_rank(n: int, fpr: float) -> int:
    """1-based rank k of the threshold among n sorted scores: k = ceil((n + 1)(1 - fpr)), at most n."""
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"target false-positive rate must lie in (0, 1), got {fpr}")
    if n < 1:
        raise ValueError("calibration needs at least one score")
    return min(n, math.ceil((n + 1) * (1.0 - fpr) - 1e-9))


def log_binomial_pmf(k: int, n: int, p: float) -> float:
    """log P(X = k) for X ~ Binomial(n, p), 0 < p < 1."""
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p) + (n - k) * math.log1p(-p)


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), 0 < p < 1, summed in log space over j = 0..k."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    logs = [log_binomial_pmf(j, n, p) for j in range(k + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * math.fsum(math.exp(t - top) for t in logs))


def confident_rank(n: int, fpr: float, confidence: float) -> int:
    """1-based rank k of a threshold among n sorted scores whose true false-positive rate is at most
    ``fpr`` with probability at least ``confidence`` (over the draw of the calibration images).

    With a = n - k scores above it, the true rate of the k-th smallest of n exchangeable continuous
    scores is Beta(a + 1, n - a) distributed, and P(Beta(a + 1, n - a) > fpr) = P(Binomial(n, fpr)
    <= a); the largest a with that at most 1 - ``confidence`` (a training-conditional conformal
    threshold, Vovk 2012). Where even a = 0 misses it (n < log(1 - confidence) / log(1 - fpr)),
    the largest score (k = n)."""
    conformal_rank(n, fpr)  # checks n and fpr
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    above = 0
    while above + 1 < n and binomial_cdf(above + 1, n, fpr) <= 1.0 - confidence:
        above += 1
    return n - above


def calibrate_scores(
    scores: np.ndarray, *, fpr: float = DEFAULT_FPR, confidence: float | None = None, n_quantiles: int = N_QUANTILES
) -> dict[str, Any]:
    """Threshold and quantiles of one score's in-distribution values (N,).

    ``is_outlier = score > threshold`` flags a fresh in-distribution image with probability about
    ``fpr`` (the conformal threshold, :func:`conformal_rank`), or with ``confidence`` at most ``fpr``
    with that probability (:func:`confident_rank`; a higher threshold); ``quantiles`` are q_0 .. q_K
    (K = n_quantiles, linear interpolation) for percentiles.
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if not np.isfinite(s).all():
        raise ValueError(f"{int((~np.isfinite(s)).sum())} calibration scores are not finite")
    n = len(s)
    k = conformal_rank(n, fpr) if confidence is None else confident_rank(n, fpr, confidence)
    if (n + 1) * (1.0 - fpr) > n or (confidence is not None and binomial_cdf(0, n, fpr) > 1.0 - confidence):
        logger.warning("%d calibration images cannot resolve a false-positive rate of %g; use more", n, fpr)
    threshold = float(s[k - 1])
    return {
        "threshold": threshold,
        "n": n,  # the scores the threshold is an order statistic of (service/drift.py bounds its rate by it)
        "above": n - k,  # of them above the threshold
        "confidence": confidence,  # P(true false-positive rate <= target), where the threshold was picked for it
        "quantiles": [float(q) for q in np.quantile(s, np.linspace(0.0, 1.0, n_quantiles + 1))],
        "fpr_on_calibration": float((s > threshold).mean()),
        "mean": float(s.mean()),
        "std": float(s.std()),
    }


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
    """The threshold and quantiles of ``score_type`` in a checkpoint's metadata (empty if uncalibrated)."""
    entry = ((meta.get("calibration") or {}).get("scores") or {}).get(score_type)
    if not entry:
        return Calibration()
    threshold = entry.get("threshold")
    quantiles = entry.get("quantiles")
    return Calibration(
        threshold=None if threshold is None else float(threshold),
        quantiles=None if not quantiles else tuple(sorted(float(q) for q in quantiles)),
    )


def threshold_sample_size(meta: dict[str, Any], score_type: str) -> int | None:
    """How many calibration scores ``score_type``'s threshold was picked from: the entry's ``n``
    (written since calibrations record it), else the dose fit's threshold half, else the images
    calibrated on; None if unknown."""
    cal = meta.get("calibration") or {}
    entry = (cal.get("scores") or {}).get(score_type) or {}
    if entry.get("n"):
        return int(entry["n"])
    if "kept_from" in entry:
        return None  # taken over from an earlier calibration whose size it does not record
    if score_type == "dose" and (cal.get("dose") or {}).get("n_threshold"):
        return int(cal["dose"]["n_threshold"])
    return int(cal["n"]) if cal.get("n") else None


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
