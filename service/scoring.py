"""Score types: the one place that says what /score computes for a batch of images.

A score type is a name looked up in :data:`SCORE_TYPES`. Its function maps ``(model, x, y)`` —
x uint8 (B, C, H, W) on the model's device, y (B,) class indices or None — to per-image tensors:
``log_prob`` (B,) in nats and ``score`` (B,), higher meaning more unusual. The built-in "nll" score
is bits/dim. More score types plug in from ``models/outliers.py`` when it exists: that module
exposes ``SCORES = {name: fn}`` with the same signature, and they are registered at import.

How a score is judged comes from the checkpoint's ``calibration`` (written by ``genserve
calibrate``): ``{"default_score": name, "scores": {name: {"threshold": t, "quantiles": [q_0..q_100]}}}``.
``is_outlier = score > threshold``; the percentile is where the score falls among the quantiles.
"""

from __future__ import annotations

import bisect
import importlib
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from models.base import AutoregressiveModel, DensityModel
from models.likelihood import bits_per_dim

ScoreFn = Callable[[DensityModel, Tensor, Tensor | None], dict[str, Tensor]]
DEFAULT_SCORE = "nll"


@dataclass(frozen=True)
class ScoreType:
    name: str
    fn: ScoreFn
    description: str = ""


SCORE_TYPES: dict[str, ScoreType] = {}


def register(name: str, fn: ScoreFn, description: str = "") -> None:
    SCORE_TYPES[name] = ScoreType(name, fn, description or (fn.__doc__ or "").strip().split("\n")[0])


def nll_from_log_prob(model: DensityModel, log_prob: Tensor) -> dict[str, Tensor]:
    return {"log_prob": log_prob, "score": torch.as_tensor(bits_per_dim(log_prob.double(), model.dims))}


def nll_score(model: DensityModel, x: Tensor, y: Tensor | None) -> dict[str, Tensor]:
    """Negative log-likelihood in bits/dim (the model's own log p(x))."""
    return nll_from_log_prob(model, model.log_prob(x, y))


register(DEFAULT_SCORE, nll_score)


def load_plugins() -> None:
    """Register the score types of ``models/outliers.py`` (its ``SCORES`` dict) when that module exists."""
    if importlib.util.find_spec("models.outliers") is None:
        return
    module = importlib.import_module("models.outliers")
    for name, fn in getattr(module, "SCORES", {}).items():
        register(name, fn)


load_plugins()


def compute(model: DensityModel, x: Tensor, y: Tensor | None, *, score_type: str, heatmap: bool) -> dict[str, Tensor]:
    """Per-image outputs for a batch: ``log_prob`` (B,) nats, ``score`` (B,), and with ``heatmap``
    ``heatmap`` (B, H, W): -log p(x_i | x_<i) summed over channels, in nats (autoregressive models)."""
    b = x.shape[0]
    if heatmap:
        assert isinstance(model, AutoregressiveModel), "heatmaps need per-pixel likelihoods"
        pixel = model.pixel_log_prob(x, y)  # (B, C, H, W) nats
        if score_type == DEFAULT_SCORE:
            out = nll_from_log_prob(model, pixel.flatten(1).sum(1))  # the same sum log_prob takes
        else:
            out = SCORE_TYPES[score_type].fn(model, x, y)
        out["heatmap"] = -pixel.sum(1)  # (B, H, W)
    else:
        out = SCORE_TYPES[score_type].fn(model, x, y)
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


def default_score_type(meta: dict[str, Any]) -> str:
    return str((meta.get("calibration") or {}).get("default_score") or DEFAULT_SCORE)


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
