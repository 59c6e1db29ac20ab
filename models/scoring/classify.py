"""Classification by Bayes' rule with a class-conditional generative model, and refusal by p(x).

p(y|x) = p(x|y) p(y) / sum_y' p(x|y') p(y'), and p(x) = sum_y p(x|y) p(y) is the model's own
marginal likelihood of the image: an image whose p(x) fails the calibrated outlier test is refused
instead of being forced into a class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from models.base import DensityModel


@dataclass
class Posterior:
    """Per image: log p(x|y) for every class (B, K), log p(x) (B,), and log p(y|x) (B, K), in nats."""

    log_likelihood: Tensor
    log_marginal: Tensor
    log_posterior: Tensor

    @property
    def predicted(self) -> Tensor:
        """The most probable class per image, (B,)."""
        return self.log_posterior.argmax(dim=1)


def uniform_prior(n_classes: int) -> Tensor:
    return torch.full((n_classes,), 1.0 / n_classes)


def training_prior(meta: dict[str, Any], n_classes: int) -> Tensor:
    """p(y) of a conditional checkpoint: its training split's class frequencies (``dataset.class_counts``
    in model.json, written by ``genserve train``), uniform where the metadata has none. Shape (K,)."""
    counts = (meta.get("dataset") or {}).get("class_counts")
    if not counts:
        return uniform_prior(n_classes)
    c = torch.tensor([float(v) for v in counts], dtype=torch.float64)
    if c.shape != (n_classes,) or bool((c < 0).any()) or float(c.sum()) <= 0:
        raise ValueError(f"dataset.class_counts {counts} does not fit a model with {n_classes} classes")
    return (c / c.sum()).float()


def check_prior(prior: Tensor, n_classes: int) -> None:
    if (
        prior.shape != (n_classes,)
        or not math.isclose(float(prior.sum()), 1.0, abs_tol=1e-4)
        or bool((prior < 0).any())
    ):
        raise ValueError(f"prior must be {n_classes} non-negative probabilities summing to 1")


def posterior_from(log_likelihood: Tensor, prior: Tensor) -> Posterior:
    """Bayes' rule from log p(x|y) (B, K) nats and p(y) (K,): log p(x) (B,) and log p(y|x) (B, K)."""
    log_joint = log_likelihood + prior.to(log_likelihood.device, log_likelihood.dtype).log()
    log_marginal = torch.logsumexp(log_joint, dim=1)
    return Posterior(
        log_likelihood=log_likelihood, log_marginal=log_marginal, log_posterior=log_joint - log_marginal[:, None]
    )


def class_posterior(model: DensityModel, x: Tensor, prior: Tensor | None = None) -> Posterior:
    """Bayes' rule over every class of a class-conditional model.

    x: (B, C, H, W) integer images; prior: p(y), shape (K,), summing to 1 (default uniform).
    Runs the model once per class (K passes over the batch).
    """
    k = model.n_classes
    if k is None:
        raise ValueError("classification needs a class-conditional model (n_classes set)")
    prior = uniform_prior(k) if prior is None else prior
    check_prior(prior, k)
    return posterior_from(class_log_likelihood(model, x), prior)


# A batch smaller than this many images shares its passes among classes: the images under several
# labels in one pass of at most this many (a lone image's 10 classes: one pass of 10 images, not ten
# passes of one), so that a small request's passes are as large as a serving batch, and no larger.
CLASS_PASS_IMAGES = 32


def class_log_likelihood(model: DensityModel, x: Tensor) -> Tensor:
    """log p(x|y) in nats for every class y: (B, K). Each pass scores the B images under
    ``max(1, CLASS_PASS_IMAGES // B)`` classes; a compiled model's, under one class. Each image's
    result depends on that image and label alone: the values of one pass per class (identical on the
    CPU's fast PixelCNN pass; elsewhere up to float rounding, where kernels depend on the batch size)."""
    k = model.n_classes
    if k is None:
        raise ValueError("classification needs a class-conditional model (n_classes set)")
    b = x.shape[0]
    # A compiled model (models/compiled.py) has graphs for the batch sizes its server warmed up, up to
    # GENSERVE_MAX_BATCH_SIZE, which may be below CLASS_PASS_IMAGES: one class per pass there.
    compiled = getattr(model, "compiled_log_prob", None) is not None
    per_pass = 1 if compiled else max(1, CLASS_PASS_IMAGES // max(b, 1))
    parts = []
    for first in range(0, k, per_pass):
        n = min(per_pass, k - first)
        labels = torch.arange(first, first + n, device=x.device).repeat_interleave(b)  # class-major
        parts.append(model.log_prob(x.repeat(n, *([1] * (x.dim() - 1))), labels).view(n, b))
    return torch.cat(parts).t().contiguous()
