"""Drift statistics of a model's recent uploads: pure functions and a sliding window, no I/O.

Every /score upload scored with the model's calibrated default score gives a score and a flag
(score > threshold). Over a window of the last ``size`` uploads (none older than ``max_age_s``):

- **binomial test** of the flagged fraction: under no drift each upload is flagged with probability
  at most the calibrated false-positive rate p0 (``calibration.target_fpr``), so the number flagged
  k of n is at most Binomial(n, p0) and the one-sided p-value is P(X >= k), summed exactly in log
  space (:func:`binomial_sf`);
- **Kolmogorov-Smirnov test** of the scores against the calibration scores' distribution, which the
  checkpoint keeps as quantiles q_0..q_100: their CDF is the linear interpolation through
  (q_i, i/100) (:func:`ks_against_quantiles`). The p-value is Kolmogorov's asymptotic one with the
  two-sample effective size n*m/(n+m) (m calibration images) and Stephens' small-sample correction.
  The interpolated CDF is within 0.01 of the calibration scores' empirical one, so D is within 0.01.

The window drifts when either p-value is below ``alpha``; with fewer than ``min_uploads`` in the
window nothing is tested (p-values None).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from models.scoring.calibration import binomial_cdf, conformal_rank, log_binomial_pmf

KOLMOGOROV_TERMS = 100


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): the one-sided p-value of k successes in n trials.

    Summed term by term from k upwards in log space (log-sum-exp), so tiny tails keep their digits;
    the sum stops once the terms, falling past the mode, no longer change it.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must lie in [0, 1], got {p}")
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p == 0.0:
        return 0.0
    if p == 1.0:
        return 1.0
    logs: list[float] = []
    mode = (n + 1) * p
    for j in range(k, n + 1):
        term = log_binomial_pmf(j, n, p)
        logs.append(term)
        if j > mode and term < max(logs) - 40.0:  # e^-40 ~ 4e-18: below a double's resolution of the sum
            break
    top = max(logs)
    return min(1.0, math.exp(top) * math.fsum(math.exp(t - top) for t in logs))


def fpr_upper_bound(n: int, fpr: float, *, confidence: float, above: int | None = None) -> float:
    """An upper ``confidence`` bound on the rate at which a threshold calibrated on ``n`` scores
    flags fresh in-distribution images, from ``n`` and the number ``above`` it (default: the
    conformal threshold's for the target ``fpr``).

    The conformal threshold is the k-th smallest of the n calibration scores, k = ceil((n + 1)(1 -
    fpr)) (models/scoring/calibration.py), so a = n - k of them lie above it; a threshold calibrated
    with a confidence records its own a (``above``). For exchangeable continuous
    scores the threshold's true flag rate is Beta(a + 1, k) distributed (the order statistic's
    coverage), whose ``confidence`` quantile u solves P(Binomial(n, u) <= a) = 1 - confidence: the
    Clopper-Pearson upper bound for a of n. Found by bisection to a relative 1e-9.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    above = n - conformal_rank(n, fpr) if above is None else above
    lo, hi = above / n, 1.0
    while hi - lo > 1e-9 * hi:
        mid = 0.5 * (lo + hi)
        if binomial_cdf(above, n, mid) > 1.0 - confidence:
            lo = mid
        else:
            hi = mid
    return hi


def kolmogorov_sf(x: float) -> float:
    """P(K > x) for Kolmogorov's distribution: 2 * sum_{j>=1} (-1)^(j-1) exp(-2 j^2 x^2)."""
    if x <= 0.0:
        return 1.0
    if x < 0.2:  # the series converges slowly here, and the probability is 1 to double precision
        return 1.0
    total = 0.0
    for j in range(1, KOLMOGOROV_TERMS + 1):
        term = math.exp(-2.0 * j * j * x * x)
        total += term if j % 2 else -term
        if term < 1e-18:
            break
    return min(1.0, max(0.0, 2.0 * total))


def quantile_cdf(scores: np.ndarray, quantiles: Sequence[float]) -> np.ndarray:
    """The calibration CDF at ``scores``: linear through (q_i, i/K) for quantiles q_0..q_K; 0 below q_0, 1 above q_K."""
    q = np.asarray(quantiles, dtype=np.float64)
    levels = np.linspace(0.0, 1.0, len(q))
    return np.interp(scores, q, levels, left=0.0, right=1.0)


@dataclass(frozen=True)
class KSResult:
    statistic: float  # sup |F_recent - F_calibration|, in [0, 1]
    p_value: float


def ks_against_quantiles(scores: Sequence[float], quantiles: Sequence[float], *, reference_n: int | None) -> KSResult:
    """KS test of ``scores`` (n >= 1) against the CDF that the calibration quantiles describe.

    ``reference_n``: calibration images behind the quantiles (None: treat the CDF as exact, one-sample).
    """
    x = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(x)
    if n == 0:
        raise ValueError("the KS test needs at least one score")
    f = quantile_cdf(x, quantiles)
    i = np.arange(1, n + 1, dtype=np.float64)
    d = float(max(np.max(i / n - f), np.max(f - (i - 1) / n)))
    ne = n if not reference_n else n * reference_n / (n + reference_n)
    root = math.sqrt(ne)
    return KSResult(statistic=d, p_value=kolmogorov_sf((root + 0.12 + 0.11 / root) * d))


@dataclass(frozen=True)
class DriftStats:
    """The tests of one window; p-values are None while the window holds fewer than ``min_uploads``."""

    uploads: int
    flagged: int
    flagged_fraction: float | None
    expected_fraction: float
    binomial_p_value: float | None
    ks_statistic: float | None
    ks_p_value: float | None
    alpha: float
    drift: bool


class DriftWindow:
    """The last ``size`` (score, flag) pairs of one model, none older than ``max_age_s``.

    ``clock`` (seconds, monotonic) is injectable for tests. Not thread-safe: the event loop owns it.
    """

    def __init__(
        self,
        *,
        size: int,
        max_age_s: float,
        fpr: float,
        quantiles: Sequence[float],
        reference_n: int | None,
        alpha: float = 0.001,
        min_uploads: int = 100,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if size < 1 or max_age_s <= 0 or not 0.0 < fpr < 1.0 or len(quantiles) < 2:
            raise ValueError("a drift window needs size >= 1, max_age_s > 0, 0 < fpr < 1 and >= 2 quantiles")
        self.size, self.max_age_s, self.fpr, self.alpha = size, max_age_s, fpr, alpha
        self.quantiles = tuple(sorted(float(q) for q in quantiles))
        self.reference_n = reference_n
        self.min_uploads = min_uploads
        self.clock = clock
        self._items: deque[tuple[float, float, bool]] = deque(maxlen=size)  # (time, score, flagged)

    def add(self, score: float, flagged: bool) -> None:
        if math.isnan(score):
            return
        # Beyond the outer quantiles the calibration CDF is flat: an infinite score counts as any score there.
        score = min(max(score, self.quantiles[0] - 1.0), self.quantiles[-1] + 1.0)
        self._items.append((self.clock(), score, flagged))

    def _expire(self) -> None:
        oldest = self.clock() - self.max_age_s
        while self._items and self._items[0][0] < oldest:
            self._items.popleft()

    def __len__(self) -> int:
        self._expire()
        return len(self._items)

    def stats(self) -> DriftStats:
        self._expire()
        n = len(self._items)
        k = sum(1 for _, _, f in self._items if f)
        fraction = k / n if n else None
        if n < max(1, self.min_uploads):
            return DriftStats(n, k, fraction, self.fpr, None, None, None, self.alpha, False)
        p_binom = binomial_sf(k, n, self.fpr)
        ks = ks_against_quantiles([s for _, s, _ in self._items], self.quantiles, reference_n=self.reference_n)
        drift = p_binom < self.alpha or ks.p_value < self.alpha
        return DriftStats(n, k, fraction, self.fpr, p_binom, ks.statistic, ks.p_value, self.alpha, drift)
