"""Discrete likelihoods over quantised images, in nats.

Every number genserve reports is the log-probability of the *discrete* image: each sub-pixel takes
one of ``levels`` values (256 for 8-bit images), so log-likelihoods from different models are
comparable and are true log-probabilities (never densities).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def bits_per_dim(log_prob_nats: Tensor | float, dims: int) -> Tensor | float:
    """Bits per dimension from a log-probability in nats.

    ``log_prob_nats``: log p(x) in nats (per image, any shape); ``dims``: sub-pixels per image
    (C*H*W). Returns -log p(x) / (dims * ln 2).
    """
    if dims <= 0:
        raise ValueError(f"dims must be positive, got {dims}")
    return -log_prob_nats / (dims * math.log(2.0))


def to_unit_range(x: Tensor, levels: int) -> Tensor:
    """Map integer levels in [0, levels-1] (any integer dtype) to floats in [-1, 1]."""
    return x.float() * (2.0 / (levels - 1)) - 1.0


def categorical_log_prob(logits: Tensor, x: Tensor) -> Tensor:
    """Log-probability of integer values under per-sub-pixel categoricals.

    logits: (B, C, L, H, W) unnormalised, L = levels; x: (B, C, H, W) integers in [0, L-1].
    Returns (B, C, H, W) log-probabilities in nats.
    """
    assert logits.dim() == 5 and x.dim() == 4, (logits.shape, x.shape)
    logp = F.log_softmax(logits.float(), dim=2)  # (B, C, L, H, W)
    return logp.gather(2, x.long().unsqueeze(2)).squeeze(2)


def discretized_logistic_mixture_log_prob(
    x: Tensor, *, logit_weights: Tensor, means: Tensor, log_scales: Tensor, levels: int
) -> Tensor:
    """Log-probability of integer sub-pixels under a discretised mixture of logistics.

    x: (B, C, H, W) integers in [0, levels-1]; logit_weights, means, log_scales: (B, C, K, H, W),
    means in the [-1, 1] units of :func:`to_unit_range`. Each level owns the bin of width
    2/(levels-1) around its centre; the lowest and highest levels take the tails, so the
    probabilities of all levels sum to exactly one (PixelCNN++, Salimans et al. 2017).
    Returns (B, C, H, W) log-probabilities in nats.
    """
    assert logit_weights.shape == means.shape == log_scales.shape, "mixture parameter shapes differ"
    assert x.dim() == 4 and means.dim() == 5, (x.shape, means.shape)
    xc = to_unit_range(x, levels).unsqueeze(2)  # (B, C, 1, H, W) bin centres
    half = 1.0 / (levels - 1)
    log_scales = log_scales.float().clamp(-7.0, 30.0)
    inv_s = torch.exp(-log_scales)
    centered = xc - means.float()
    plus = inv_s * (centered + half)
    minus = inv_s * (centered - half)
    log_cdf_plus = -F.softplus(-plus)  # log sigmoid(plus): lowest level takes the left tail
    log_one_minus_cdf_min = -F.softplus(minus)  # log(1 - sigmoid(minus)): highest level, right tail
    # log(sigmoid(plus) - sigmoid(minus)) without cancellation in either tail, from
    # sigmoid(b) - sigmoid(a) = sigmoid(b) * (1 - sigmoid(a)) * (1 - exp(a - b)); b - a is the bin
    # width in scale units. (PixelCNN++ approximates tiny bins by density * width instead, which is
    # off by nats in the tails of sharp components.)
    width = (2.0 * half) * inv_s
    log_delta = log_cdf_plus + log_one_minus_cdf_min + torch.log(-torch.expm1(-width))
    low = xc <= -1.0 + 1e-6
    high = xc >= 1.0 - 1e-6
    log_probs = torch.where(low, log_cdf_plus, torch.where(high, log_one_minus_cdf_min, log_delta))
    log_probs = log_probs + F.log_softmax(logit_weights.float(), dim=2)
    return torch.logsumexp(log_probs, dim=2)  # (B, C, H, W)


def discretized_logistic_mixture_probs(
    *, logit_weights: Tensor, means: Tensor, log_scales: Tensor, levels: int
) -> Tensor:
    """Probabilities of every level, shape (B, C, levels, H, W); each (b, c, :, h, w) sums to 1."""
    b, c, _, h, w = means.shape
    values = torch.arange(levels, device=means.device).view(1, 1, levels, 1, 1)
    out = []
    for v in range(levels):
        xv = values[:, :, v].expand(b, c, h, w)
        out.append(
            discretized_logistic_mixture_log_prob(
                xv, logit_weights=logit_weights, means=means, log_scales=log_scales, levels=levels
            ).exp()
        )
    return torch.stack(out, dim=2)


def sample_discretized_logistic_mixture(
    *,
    logit_weights: Tensor,
    means: Tensor,
    log_scales: Tensor,
    levels: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw integer sub-pixels (B, C, H, W) in [0, levels-1] from the discretised mixture."""
    u = torch.rand(logit_weights.shape, generator=generator, device=logit_weights.device)
    gumbel = -torch.log(-torch.log(u.clamp(1e-10, 1.0 - 1e-7)))
    k = (logit_weights.float() + gumbel).argmax(dim=2, keepdim=True)  # (B, C, 1, H, W)
    mu = means.float().gather(2, k).squeeze(2)
    ls = log_scales.float().clamp(min=-7.0).gather(2, k).squeeze(2)
    u2 = torch.rand(mu.shape, generator=generator, device=mu.device).clamp(1e-5, 1.0 - 1e-5)
    xs = mu + torch.exp(ls) * (torch.log(u2) - torch.log1p(-u2))  # logistic draw in [-1, 1] units
    q = torch.round((xs + 1.0) * (levels - 1) / 2.0)
    return q.clamp(0, levels - 1).to(torch.uint8 if levels <= 256 else torch.int64)
