"""The drift statistics (service/drift.py) on constructed score streams, and the drift endpoint and gauges."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import numpy as np
import pytest

from models.checkpoint import update_metadata
from service.drift import DriftWindow, binomial_sf, kolmogorov_sf, ks_against_quantiles
from tests.service.helpers import b64, gray_png, running

QUANTILES = [float(q) for q in np.quantile(np.random.default_rng(0).normal(size=100_000), np.linspace(0, 1, 101))]
THRESHOLD = float(np.quantile(np.random.default_rng(0).normal(size=100_000), 0.99))


def brute_binomial_sf(k: int, n: int, p: float) -> float:
    """The exact tail in rationals (no underflow), as a float."""
    q = Fraction(str(p))
    return float(sum(math.comb(n, j) * q**j * (1 - q) ** (n - j) for j in range(k, n + 1)))


@pytest.mark.parametrize(("k", "n", "p"), [(0, 10, 0.1), (1, 10, 0.1), (3, 10, 0.1), (10, 10, 0.5), (25, 1000, 0.01),
                                           (5, 50, 0.3), (11, 10, 0.2)])  # fmt: skip
def test_binomial_tail_matches_the_sum_of_the_pmf(k: int, n: int, p: float) -> None:
    assert binomial_sf(k, n, p) == pytest.approx(brute_binomial_sf(k, n, p), rel=1e-9, abs=1e-300)


def test_binomial_tail_keeps_tiny_p_values() -> None:
    # 200 of 1000 flagged at p0 = 0.01: far beyond double precision for 1 - cdf, exact here.
    p = binomial_sf(200, 1000, 0.01)
    assert 0.0 < p < 1e-100
    assert math.log(p) == pytest.approx(math.log(brute_binomial_sf(200, 1000, 0.01)), rel=1e-9)


def test_kolmogorov_distribution_known_values() -> None:
    assert kolmogorov_sf(0.0) == 1.0
    assert kolmogorov_sf(1.358) == pytest.approx(0.05, abs=5e-4)  # the classic 5% critical value
    assert kolmogorov_sf(1.949) == pytest.approx(0.001, abs=5e-5)


def test_ks_against_quantiles_accepts_the_same_distribution_and_rejects_a_shift() -> None:
    rng = np.random.default_rng(1)
    same = ks_against_quantiles(rng.normal(size=1000), QUANTILES, reference_n=5000)
    shifted = ks_against_quantiles(rng.normal(0.3, 1.0, size=1000), QUANTILES, reference_n=5000)
    assert same.statistic < 0.05 and same.p_value > 0.01
    assert shifted.statistic > 0.1 and shifted.p_value < 1e-6


def make_window(clock: list[float] | None = None, **kw: Any) -> DriftWindow:
    args: dict[str, Any] = {"size": 1000, "max_age_s": 3600.0, "fpr": 0.01, "quantiles": QUANTILES,
                            "reference_n": 5000, "alpha": 0.001, "min_uploads": 100}  # fmt: skip
    if clock is not None:
        args["clock"] = lambda: clock[0]
    return DriftWindow(**{**args, **kw})


def feed(window: DriftWindow, scores: np.ndarray) -> None:
    for s in scores:
        window.add(float(s), bool(s > THRESHOLD))


def test_no_drift_stream_does_not_fire() -> None:
    window = make_window()
    feed(window, np.random.default_rng(2).normal(size=3000))
    stats = window.stats()
    assert stats.uploads == 1000
    assert not stats.drift
    assert stats.binomial_p_value is not None and stats.binomial_p_value > 0.001


def test_sudden_drift_fires_within_one_window() -> None:
    rng = np.random.default_rng(3)
    window = make_window()
    feed(window, rng.normal(size=1000))
    assert not window.stats().drift
    outliers = rng.normal(4.0, 1.0, size=200)  # 20% of a window far above the threshold
    feed(window, outliers)
    stats = window.stats()
    assert stats.drift and stats.binomial_p_value is not None and stats.binomial_p_value < 1e-10
    assert stats.flagged_fraction is not None and stats.flagged_fraction > 0.15


def test_gradual_drift_fires_once_the_shift_has_grown() -> None:
    rng = np.random.default_rng(4)
    window = make_window()
    fired_at = None
    for step in range(20):  # the mean creeps up by 0.05 per 500 uploads
        feed(window, rng.normal(0.05 * step, 1.0, size=500))
        if window.stats().drift and fired_at is None:
            fired_at = step
    assert fired_at is not None and 2 <= fired_at < 20
    stats = window.stats()
    assert stats.ks_p_value is not None and stats.ks_p_value < 0.001


def test_small_windows_report_no_p_values_and_old_uploads_expire() -> None:
    clock = [0.0]
    window = make_window(clock, max_age_s=60.0)
    feed(window, np.full(50, 10.0))  # all flagged, but too few to test
    stats = window.stats()
    assert stats.uploads == 50 and stats.flagged == 50 and stats.binomial_p_value is None and not stats.drift
    clock[0] = 61.0
    assert window.stats().uploads == 0
    window.add(float("inf"), True)  # infinite scores count, clamped beyond the last quantile
    window.add(float("nan"), False)  # NaN is dropped
    assert len(window) == 1


@pytest.fixture
def calibrated_dir(model_dir: Any, tmp_path: Any) -> Any:
    """A copy of the tiny pixelcnn with an nll calibration (threshold 1.0 bits/dim, median 0.5)."""
    import shutil

    shutil.copytree(model_dir / "pixelcnn", tmp_path / "pixelcnn")
    quantiles = list(np.linspace(0.0, 1.0, 101))
    cal = {"default_score": "nll", "target_fpr": 0.01, "n": 1000,
           "scores": {"nll": {"threshold": 0.99, "quantiles": quantiles}}}  # fmt: skip
    update_metadata(tmp_path / "pixelcnn", calibration=cal)
    return tmp_path


@pytest.mark.anyio
async def test_drift_endpoint_and_gauges(calibrated_dir: Any, make_settings: Any) -> None:
    settings = make_settings(model_dir=calibrated_dir, drift_min_uploads=4, drift_fpr_margin=1.0)
    async with running(settings) as (app, client):
        r = await client.get("/models/pixelcnn/drift")
        assert r.status_code == 200 and r.json()["uploads"] == 0 and r.json()["calibrated"] is True
        body = {"model": "pixelcnn", "images": [b64(gray_png(i)) for i in range(4)]}
        assert (await client.post("/score", json=body)).status_code == 200
        # random 8x8 noise costs ~8 bits/dim under a tiny untrained model: every upload is flagged
        r = await client.get("/models/pixelcnn/drift")
        d = r.json()
        assert d["uploads"] == 4 and d["flagged"] == 4 and d["score_type"] == "nll"
        assert d["binomial_p_value"] == pytest.approx(0.01**4) and d["drift"] is True
        assert d["ks_statistic"] == pytest.approx(1.0)
        m = app.state.metrics
        assert m.sample_value("genserve_drift", {"model": "pixelcnn"}) == 1.0
        assert m.sample_value("genserve_drift_window_uploads", {"model": "pixelcnn"}) == 4.0
        assert (await client.get("/models/nope/drift")).status_code == 404


@pytest.mark.anyio
async def test_uncalibrated_model_has_no_window(make_settings: Any) -> None:
    async with running(make_settings(models="vae")) as (_, client):
        r = await client.get("/models/vae/drift")
        assert r.status_code == 200 and r.json()["calibrated"] is False and r.json()["drift"] is False
