"""What /score runs in a worker for one batch, and how its heatmaps are scaled.

The scores, the scorer and the calibration live in :mod:`models.scoring`: each worker holds a
:class:`~models.scoring.scorer.Scorer` built from its model folder (the model, plus the background
model in ``<folder>/background/`` on the same device where there is one), and :func:`compute` runs
it and adds Bayes' rule for class-conditional models.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from models.base import DensityModel
from models.scoring.classify import posterior_from
from models.scoring.dose import DoseFit, explain
from models.scoring.scorer import Scorer


def explanation(fit: DoseFit, out: dict[str, Tensor], i: int, threshold: float | None) -> dict[str, Any] | None:
    """The ``explanation`` of image i's dose score from :func:`compute`'s outputs (None for other
    score types): each statistic's value, tail probability and share of the score."""
    if "dose_values" not in out:
        return None
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
