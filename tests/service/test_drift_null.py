"""The binomial drift test's null rate (service/drift.py fpr_upper_bound, service/drift_monitor.py
null_rate): an upper confidence bound on the flag rate of a threshold picked from n calibration
scores, checked on constructed calibrations and streams."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction
from typing import Any

import numpy as np
import pytest

from models.scoring.calibration import conformal_rank, threshold_sample_size
from service.drift import binomial_cdf, binomial_sf, fpr_upper_bound
from service.drift_monitor import null_rate
from service.settings import Settings


@pytest.mark.parametrize(("k", "n", "p"), [(0, 10, 0.1), (3, 10, 0.1), (49, 5000, 0.0149), (9, 10, 0.5)])
def test_binomial_cdf_matches_the_sum_of_the_pmf(k: int, n: int, p: float) -> None:
    q = Fraction(str(p))
    exact = float(sum(math.comb(n, j) * q**j * (1 - q) ** (n - j) for j in range(k + 1)))
    assert binomial_cdf(k, n, p) == pytest.approx(exact, rel=1e-9)
    assert binomial_cdf(k, n, p) + binomial_sf(k + 1, n, p) == pytest.approx(1.0, rel=1e-9)


@pytest.mark.parametrize("confidence", [0.5, 0.9, 0.99])
def test_the_bound_covers_the_true_rate_of_random_calibrations(confidence: float) -> None:
    """4,000 calibrations of 500 uniform scores: the threshold's true flag rate (1 - threshold)
    exceeds the bound in 1 - confidence of them (binomial error of the estimate ~0.5%)."""
    n, trials = 500, 4000
    rng = np.random.default_rng(1)
    thresholds = np.sort(rng.random((trials, n)), axis=1)[:, conformal_rank(n, 0.01) - 1]
    bound = fpr_upper_bound(n, 0.01, confidence=confidence)
    missed = float(((1.0 - thresholds) > bound).mean())
    assert missed == pytest.approx(1.0 - confidence, abs=4 * math.sqrt(confidence * (1 - confidence) / trials) + 1e-3)


def test_the_bound_tightens_with_more_calibration_scores() -> None:
    bounds = [fpr_upper_bound(n, 0.01, confidence=0.999) for n in (500, 1000, 2500, 5000, 50_000)]
    assert all(a > b for a, b in itertools.pairwise(bounds))
    assert 0.0149 < bounds[3] < 0.0150 and 0.0100 < bounds[-1] < 0.0115
    assert fpr_upper_bound(5000, 0.01, confidence=0.5) == pytest.approx(0.00993, abs=2e-5)  # the Beta median
    # 50 scores put the threshold at their maximum, whose rate is Beta(1, 50): P(rate > u) = (1 - u)^50
    assert fpr_upper_bound(50, 0.01, confidence=0.99) == pytest.approx(1 - 0.01 ** (1 / 50), rel=1e-6)
    with pytest.raises(ValueError, match="confidence"):
        fpr_upper_bound(100, 0.01, confidence=1.0)


def test_clean_windows_of_random_calibrations_rarely_fire_against_the_bound() -> None:
    """3,000 deployments: a threshold calibrated on 1,000 uniform scores, then a clean window of
    1,000 uploads. Against the calibrated rate itself the test (alpha 0.01) fires far more often
    than alpha, because the threshold's own rate varies; against the 99% bound it fires at most
    alpha + 1% of the time."""
    n, window, trials, alpha = 1000, 1000, 3000, 0.01
    rng = np.random.default_rng(2)
    thresholds = np.sort(rng.random((trials, n)), axis=1)[:, conformal_rank(n, 0.01) - 1]
    flagged = rng.binomial(window, 1.0 - thresholds)

    def fired(null: float) -> float:
        return float(np.mean([binomial_sf(int(k), window, null) < alpha for k in flagged]))

    assert fired(0.01) > 0.03
    assert fired(fpr_upper_bound(n, 0.01, confidence=1 - alpha)) <= alpha + 0.01


def test_a_drifted_stream_still_fires_against_the_bound() -> None:
    """5% of uploads flagged (five times the 1% target) in a window of 1,000: p < 0.001 against the
    bound of a 5,000-score calibration (1.49%)."""
    null = fpr_upper_bound(5000, 0.01, confidence=0.999)
    assert binomial_sf(50, 1000, null) < 1e-9
    assert binomial_sf(15, 1000, null) > 0.4  # the clean rate does not


def meta(**cal: Any) -> dict[str, Any]:
    return {"calibration": {"target_fpr": 0.01, **cal}}


def test_threshold_sample_size_per_score_type() -> None:
    m = meta(n=2000, dose={"n_threshold": 1000}, scores={"dose": {}, "nll": {}, "lr": {"kept_from": "x"}})
    assert threshold_sample_size(m, "dose") == 1000  # the dose threshold comes from its held-out half
    assert threshold_sample_size(m, "nll") == 2000
    assert threshold_sample_size(m, "lr") is None
    assert threshold_sample_size(meta(n=2000, scores={"nll": {"n": 300}}), "nll") == 300
    assert threshold_sample_size({}, "nll") is None


def test_null_rate_is_the_bound_unless_a_margin_overrides_it() -> None:
    m = meta(n=5000, scores={"nll": {}})
    assert null_rate(m, "nll", Settings()) == pytest.approx(fpr_upper_bound(5000, 0.01, confidence=0.999))
    assert null_rate(m, "nll", Settings(drift_alpha=0.01)) == pytest.approx(
        fpr_upper_bound(5000, 0.01, confidence=0.99)
    )
    assert null_rate(m, "nll", Settings(drift_fpr_margin=1.5)) == pytest.approx(0.015)
    assert null_rate(meta(scores={"nll": {}}), "nll", Settings()) == 0.01  # size unknown: the calibrated rate
