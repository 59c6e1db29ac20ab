"""Discrete likelihood helpers: bits/dim, categoricals, the discretised logistic mixture, draws."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from models.base import draw_categorical
from models.likelihood import (
    bits_per_dim,
    categorical_log_prob,
    discretized_logistic_mixture_log_prob,
    discretized_logistic_mixture_probs,
    sample_discretized_logistic_mixture,
    to_unit_range,
)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and do not stall when other jobs share the CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def mixture_params(shape: tuple[int, ...], *, seed: int = 0, mean_scale: float = 2.0) -> dict[str, torch.Tensor]:
    """Random mixture parameters (B, C, K, H, W): means well outside [-1, 1] and scales from tiny to huge."""
    g = torch.Generator().manual_seed(seed)
    return {
        "logit_weights": torch.randn(shape, generator=g) * 3.0,
        "means": torch.randn(shape, generator=g) * mean_scale,
        "log_scales": torch.rand(shape, generator=g) * 16.0 - 10.0,  # [-10, 6], below the -7 clamp too
    }


def logistic_cdf(t: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(t.double())


# -- bits per dim ------------------------------------------------------------------------------


def test_uniform_model_over_256_levels_is_exactly_8_bits_per_dim() -> None:
    dims = 3 * 4 * 5
    log_prob = torch.full((7,), -dims * math.log(256.0), dtype=torch.float64)
    bpd = bits_per_dim(log_prob, dims)
    assert isinstance(bpd, torch.Tensor)
    torch.testing.assert_close(bpd, torch.full((7,), 8.0, dtype=torch.float64), rtol=0, atol=1e-12)
    assert bits_per_dim(-dims * math.log(2.0), dims) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("dims", [0, -3])
def test_bits_per_dim_rejects_non_positive_dims(dims: int) -> None:
    with pytest.raises(ValueError, match="dims"):
        bits_per_dim(torch.zeros(1), dims)


def test_to_unit_range_maps_end_levels_to_minus_one_and_one() -> None:
    for levels in (2, 3, 256):
        x = torch.tensor([0, levels - 1], dtype=torch.uint8 if levels <= 256 else torch.long)
        torch.testing.assert_close(to_unit_range(x, levels), torch.tensor([-1.0, 1.0]))
    assert to_unit_range(torch.tensor([1]), 3).item() == 0.0


# -- categorical ---------------------------------------------------------------------------------


def test_categorical_log_prob_is_normalised_and_picks_the_value() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 5, 4, 4, generator=g) * 4  # (B, C, L, H, W)
    total = torch.zeros(2, 3, 4, 4)
    for v in range(5):
        x = torch.full((2, 3, 4, 4), v, dtype=torch.uint8)
        lp = categorical_log_prob(logits, x)
        torch.testing.assert_close(lp, torch.log_softmax(logits, dim=2)[:, :, v])
        total += lp.exp()
    torch.testing.assert_close(total, torch.ones_like(total))


def test_draw_categorical_frequencies_follow_softmax_and_report_untempered_log_prob() -> None:
    logits = torch.tensor([[0.0, 1.0, -1.0, 2.0]]).expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    v, lp = draw_categorical(logits, 1.0, g)
    freq = torch.bincount(v, minlength=4).double() / len(v)
    probs = torch.softmax(logits[0].double(), 0)
    assert (freq - probs).abs().max() < 0.015
    torch.testing.assert_close(lp, torch.log_softmax(logits, 1).gather(1, v[:, None]).squeeze(1))

    # A low temperature concentrates on the mode but the reported log-prob stays the model's own.
    v_cold, lp_cold = draw_categorical(logits, 0.01, torch.Generator().manual_seed(0))
    assert (v_cold == 3).all()
    torch.testing.assert_close(lp_cold, torch.log_softmax(logits, 1)[:, 3])


def test_draw_categorical_is_reproducible_with_a_generator() -> None:
    logits = torch.randn(64, 7, generator=torch.Generator().manual_seed(3))
    a = draw_categorical(logits, 0.7, torch.Generator().manual_seed(5))
    b = draw_categorical(logits, 0.7, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# -- discretised logistic mixture ----------------------------------------------------------------


@pytest.mark.parametrize("levels", [2, 3, 16, 256])
def test_mixture_probabilities_sum_to_one_for_random_params(levels: int) -> None:
    params = mixture_params((3, 2, 4, 3, 3), seed=levels)
    probs = discretized_logistic_mixture_probs(**params, levels=levels)
    assert probs.shape == (3, 2, levels, 3, 3)
    assert (probs >= 0).all()
    torch.testing.assert_close(probs.sum(2), torch.ones(3, 2, 3, 3), rtol=0, atol=1e-4)


def test_mixture_probabilities_sum_to_one_at_extreme_means_and_scales() -> None:
    means = torch.tensor([-20.0, -1.5, -1.0, -0.999, -0.5 / 255, 0.0, 0.3, 1.0, 1.5, 20.0])
    log_scales = torch.tensor([-30.0, -7.0, -6.0, -4.0, -1.0, 0.0, 3.0, 8.0, 15.0])
    m, s = torch.meshgrid(means, log_scales, indexing="ij")
    shape = (1, 1, 1, *m.shape)  # every (mean, scale) pair as one pixel of a one-component mixture
    probs = discretized_logistic_mixture_probs(
        logit_weights=torch.zeros(shape), means=m.reshape(shape), log_scales=s.reshape(shape), levels=256
    )
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(2), torch.ones(1, 1, *m.shape), rtol=0, atol=1e-4)


def brute_force_log_prob(x: torch.Tensor, params: dict[str, torch.Tensor], levels: int) -> torch.Tensor:
    """log sum_k pi_k (F_k(x + half) - F_k(x - half)) by plain float64 CDF differences, edges to +-inf.

    Right of a component's mean the difference is taken between survival functions 1 - F, which
    are small there, so float64 resolves bins down to ~1e-300 on both sides.
    """
    half = 1.0 / (levels - 1)
    pi = torch.softmax(params["logit_weights"].double(), dim=2)
    mu, inv_s = params["means"].double(), torch.exp(-params["log_scales"].double())
    centre = (-1.0 + 2.0 * x.double() / (levels - 1)).unsqueeze(2)
    a, b = (centre - half - mu) * inv_s, (centre + half - mu) * inv_s
    a = torch.where(centre < -1 + 1e-9, -torch.inf, a)
    b = torch.where(centre > 1 - 1e-9, torch.inf, b)
    mass = torch.where(centre > mu, logistic_cdf(-a) - logistic_cdf(-b), logistic_cdf(b) - logistic_cdf(a))
    return (mass * pi).sum(2).log()


@pytest.mark.parametrize("levels", [2, 8, 256])
def test_log_prob_matches_a_brute_force_cdf_difference(levels: int) -> None:
    params = mixture_params((2, 2, 3, 4, 4), seed=7, mean_scale=0.8)
    params["log_scales"] = params["log_scales"].clamp(-7.0, 2.0)
    for v in range(0, levels, max(1, levels // 16)):
        x = torch.full((2, 2, 4, 4), v, dtype=torch.uint8)
        got = discretized_logistic_mixture_log_prob(x, **params, levels=levels)
        assert got.shape == (2, 2, 4, 4)
        ref = brute_force_log_prob(x, params, levels)
        resolved = ref > -650.0  # float64 holds bin masses down to ~1e-300
        assert resolved.float().mean() > 0.9
        torch.testing.assert_close(got.double()[resolved], ref[resolved], rtol=1e-5, atol=1e-4)


def test_log_prob_is_exact_in_the_tails_of_sharp_components() -> None:
    # Far-tail bins of a narrow logistic hold 1e-280..1e-6 of the mass: float64 CDF differences
    # still resolve them, and the float32 log-prob must agree (no density * width shortcut).
    levels = 256
    x = torch.arange(levels, dtype=torch.uint8).view(1, 1, 1, levels)  # every level once
    shape = (1, 1, 1, 1, levels)
    for log_scale in (-7.0, -6.0, -5.0, -4.0):
        params = {
            "logit_weights": torch.zeros(shape),
            "means": torch.full(shape, 0.1),
            "log_scales": torch.full(shape, log_scale),
        }
        got = discretized_logistic_mixture_log_prob(x, **params, levels=levels).double()
        ref = brute_force_log_prob(x, params, levels)
        resolved = ref > -650.0  # float64 holds bin masses down to ~1e-300
        assert resolved.sum() > 20
        torch.testing.assert_close(got[resolved], ref[resolved], rtol=1e-5, atol=1e-4)


def test_log_prob_has_finite_gradients_at_extreme_parameters() -> None:
    params = mixture_params((2, 1, 3, 4, 4), seed=3, mean_scale=10.0)
    params["log_scales"] = torch.linspace(-40.0, 80.0, params["log_scales"].numel()).view_as(params["log_scales"])
    for t in params.values():
        t.requires_grad_(True)
    x = torch.randint(0, 256, (2, 1, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    lp = discretized_logistic_mixture_log_prob(x, **params, levels=256)
    assert torch.isfinite(lp).all()
    lp.sum().backward()
    for t in params.values():
        assert t.grad is not None and torch.isfinite(t.grad).all()


def test_log_prob_of_a_single_component_is_the_weighted_mixture_term() -> None:
    # Two components, one with all the weight: the mixture equals that component alone.
    shape = (1, 1, 2, 2, 2)
    means = torch.tensor([0.3, -0.6]).view(1, 1, 2, 1, 1).expand(shape)
    log_scales = torch.full(shape, -2.0)
    heavy = torch.tensor([30.0, -30.0]).view(1, 1, 2, 1, 1).expand(shape)
    x = torch.tensor([[[[0, 100], [180, 255]]]], dtype=torch.uint8)
    mix = discretized_logistic_mixture_log_prob(x, logit_weights=heavy, means=means, log_scales=log_scales, levels=256)
    one = discretized_logistic_mixture_log_prob(
        x, logit_weights=torch.zeros(1, 1, 1, 2, 2), means=means[:, :, :1], log_scales=log_scales[:, :, :1], levels=256
    )
    torch.testing.assert_close(mix, one)


def test_mixture_sampler_matches_the_probabilities_and_is_reproducible() -> None:
    levels, n = 5, 40000
    base = {
        "logit_weights": torch.tensor([0.0, 1.0]),
        "means": torch.tensor([-0.7, 0.4]),
        "log_scales": torch.tensor([-1.5, -2.5]),
    }
    params = {k: v.view(1, 1, 2, 1, 1).expand(n, 1, 2, 1, 1) for k, v in base.items()}
    draws = sample_discretized_logistic_mixture(**params, levels=levels, generator=torch.Generator().manual_seed(0))
    again = sample_discretized_logistic_mixture(**params, levels=levels, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (n, 1, 1, 1) and draws.dtype == torch.uint8
    assert torch.equal(draws, again)
    freq = torch.bincount(draws.flatten().long(), minlength=levels).double() / n
    probs = discretized_logistic_mixture_probs(**{k: v[:1] for k, v in params.items()}, levels=levels).flatten()
    assert (freq - probs.double()).abs().max() < 0.01, (freq, probs)
