"""Classification by Bayes' rule with a class-conditional generative model, and refusal by p(x).

p(y|x) = p(x|y) p(y) / sum_y' p(x|y') p(y'), and p(x) = sum_y p(x|y) p(y) is the model's own
marginal likelihood of the image: an image whose p(x) fails the calibrated outlier test is refused
instead of being forced into a class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


def class_posterior(model: DensityModel, x: Tensor, prior: Tensor | None = None) -> Posterior:
    """Bayes' rule over every class of a class-conditional model.

    x: (B, C, H, W) integer images; prior: p(y), shape (K,), summing to 1 (default uniform).
    Runs the model once per class (K passes over the batch).
    """
    k = model.n_classes
    if k is None:
        raise ValueError("classification needs a class-conditional model (n_classes set)")
    prior = uniform_prior(k) if prior is None else prior
    if prior.shape != (k,) or not math.isclose(float(prior.sum()), 1.0, abs_tol=1e-4) or bool((prior < 0).any()):
        raise ValueError(f"prior must be {k} non-negative probabilities summing to 1")
    b = x.shape[0]
    loglik = torch.stack(
        [model.log_prob(x, torch.full((b,), c, dtype=torch.long, device=x.device)) for c in range(k)], dim=1
    )  # (B, K)
    log_joint = loglik + prior.to(loglik.device, loglik.dtype).log()
    log_marginal = torch.logsumexp(log_joint, dim=1)
    return Posterior(log_likelihood=loglik, log_marginal=log_marginal, log_posterior=log_joint - log_marginal[:, None])
