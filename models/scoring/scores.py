"""Outlier scores: pure functions of model outputs, in bits per dimension, higher = more anomalous.

Raw likelihood is a poor outlier score: a PixelCNN trained on Fashion-MNIST gives MNIST digits a
*higher* likelihood than its own test images (Nalisnick et al. 2019, "Do Deep Generative Models
Know What They Don't Know?"), because simple images are cheap to code under any image model.
Two corrections remove that shared "simplicity" term:

- ``likelihood_ratio`` (Ren et al. 2019, "Likelihood Ratios for Out-of-Distribution Detection"):
  log p_bg(x) - log p(x), with p_bg a smaller model of the same family trained on inputs whose
  sub-pixels were replaced by uniform noise at rate ~0.2 (``genserve train --perturb 0.2``). The
  background model learns the population statistics and not the semantics; the ratio keeps the
  semantics. The background is shipped beside its model in ``<folder>/background/``.
- ``complexity`` (Serrà et al. 2020, "Input Complexity and Out-of-Distribution Detection with
  Likelihood-based Generative Models"): -log2 p(x) - L(x), with L(x) a lossless code length
  (:mod:`models.scoring.coders`), which measures the same simplicity without having been trained on
  anything.
- ``complexity_guarded``: the complexity score plus a likelihood floor, ``complexity + 10 *
  max(0, nll - nll_cap)`` with ``nll_cap`` the largest NLL among the calibration images. Complexity
  alone subtracts a large L(x) from incompressible images such as uniform noise, whose likelihood is
  far below anything in distribution; the floor gives back raw likelihood's verdict there and changes
  nothing at or below the calibration range (docs/ood.md measures both).

This module is the one place that says which score types exist and which a model offers
(:func:`available_score_types`); the scorer, the service and the tools all ask it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from models.likelihood import bits_per_dim

NLL, COMPLEXITY, RATIO, GUARDED = "nll", "complexity", "likelihood_ratio", "complexity_guarded"
DOSE = "dose"  # the combined score of models/scoring/dose.py; offered once a calibration has fitted it
# complexity_guarded adds this many bits/dim per bit/dim of NLL above the calibration images' largest
GUARD_WEIGHT = 10.0


def nll_score(log_prob: Tensor, *, dims: int) -> Tensor:
    """Raw negative log-likelihood in bits/dim: log_prob (B,) nats -> (B,) float64."""
    return torch.as_tensor(bits_per_dim(log_prob.double(), dims))


def complexity_score(log_prob: Tensor, *, code_bits: Tensor, dims: int) -> Tensor:
    """Serrà et al.'s S(x) = -log2 p(x) - L(x), per dimension: (B,) float64 bits/dim.

    log_prob: (B,) nats; code_bits: (B,) lossless code length L(x) of each image in bits.
    """
    assert log_prob.shape == code_bits.shape, (log_prob.shape, code_bits.shape)
    return nll_score(log_prob, dims=dims) - code_bits.double().to(log_prob.device) / dims


def guarded_score(complexity: Tensor, nll: Tensor, *, nll_cap: float | None) -> Tensor:
    """The complexity score (B,) plus ``GUARD_WEIGHT`` times the NLL (B,) in bits/dim above ``nll_cap``
    (the calibration images' largest); without a cap (an uncalibrated model) the complexity score."""
    if nll_cap is None:
        return complexity
    return complexity + GUARD_WEIGHT * (nll - nll_cap).clamp_min(0.0)


def likelihood_ratio_score(log_prob: Tensor, *, background_log_prob: Tensor, dims: int) -> Tensor:
    """Ren et al.'s -LLR(x) = log p_bg(x) - log p(x), per dimension: (B,) float64 bits/dim.

    log_prob, background_log_prob: (B,) nats under the model and its background model.
    """
    assert log_prob.shape == background_log_prob.shape, (log_prob.shape, background_log_prob.shape)
    return nll_score(log_prob, dims=dims) - nll_score(background_log_prob, dims=dims)


def pixel_anomaly(pixel_log_prob: Tensor, *, background_pixel_log_prob: Tensor | None = None) -> Tensor:
    """Per-pixel anomaly map (B, H, W) in nats, summed over channels: -log p(x_i | x_<i), minus the
    background model's -log p_bg(x_i | x_<i) where given (then negative where the background finds
    the pixel harder than the model does). Inputs: (B, C, H, W) log-probabilities in nats."""
    nll = -pixel_log_prob.float().sum(1)
    if background_pixel_log_prob is None:
        return nll
    assert background_pixel_log_prob.shape == pixel_log_prob.shape
    return nll + background_pixel_log_prob.float().sum(1)


@dataclass(frozen=True)
class ScoreType:
    name: str
    description: str
    needs_background: bool = False


SCORE_TYPES: dict[str, ScoreType] = {
    NLL: ScoreType(NLL, "raw negative log-likelihood, bits/dim (fails on simple out-of-distribution images)"),
    COMPLEXITY: ScoreType(COMPLEXITY, "NLL minus lossless WebP code length, bits/dim (Serrà et al. 2020)"),
    GUARDED: ScoreType(
        GUARDED,
        "complexity + 10 * max(0, NLL - the largest calibration NLL), bits/dim: complexity with a likelihood "
        "floor for images less likely than any calibration image (before calibration: complexity)",
    ),
    RATIO: ScoreType(RATIO, "NLL minus the background model's NLL, bits/dim (Ren et al. 2019)", needs_background=True),
    DOSE: ScoreType(
        DOSE,
        "how far the normal scores of the model's summary statistics (NLL, complexity, NLL of the image against "
        "its upside-down copy, border, background, ...) lie from those of the nearest calibration images (or, in "
        "older calibrations, from their mean): their joint in-distribution density, DoSE-style (Morningstar et "
        "al. 2021); offered once calibrated",
    ),
}


def needs_code(names: Sequence[str]) -> bool:
    """True if any of the score types subtracts a lossless code length."""
    return COMPLEXITY in names or GUARDED in names


def available_score_types(*, has_background: bool, has_dose: bool = False) -> list[str]:
    """Score types a model offers: likelihood_ratio needs a background model, dose a calibration that
    fitted its densities."""
    return sorted(
        n for n, t in SCORE_TYPES.items() if (has_background or not t.needs_background) and (has_dose or n != DOSE)
    )


def recommended_score(*, has_background: bool) -> str:
    """The default chosen by the evaluation in docs/ood.md: the complexity-corrected likelihood with a
    likelihood floor, for every model (the background model's ratio and complexity alone each fail on
    a kind of outlier there)."""
    del has_background  # a stronger background model may earn the ratio the default: measure first
    return GUARDED


def score_units(name: str) -> dict[str, str]:
    units = (
        "squared distance of normal scores, higher = more anomalous"
        if name == DOSE
        else "bits/dim, higher = more anomalous"
    )
    return {"units": units, "description": SCORE_TYPES[name].description}
