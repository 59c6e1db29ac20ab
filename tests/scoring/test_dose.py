"""The dose score (models/dose.py, models/ood_stats.py): calibration on a known distribution, both
tails, the explanation, and the statistics of a model pass."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.pixelcnn import PixelCNN, PixelCNNConfig
from models.scoring.calibration import calibrate_scores
from models.scoring.dose import DoseFit, explain, fit_dose, ln_tails, log10_tail, normal_scores, silverman_bandwidth
from models.scoring.scorer import Scorer
from models.scoring.scores import DOSE, NLL
from models.scoring.statistics import BOTH, UPPER, model_statistics, vae_terms
from models.tools.score_sets import calibrate, score_images
from models.vae import VAE, VAEConfig
from tests.helpers import TINY_PIXELCNN, TINY_VAE


def gaussian_stats(n: int, seed: int, shift: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """Three correlated statistics: a known in-distribution law (shift moves one statistic's mean)."""
    rng = np.random.default_rng(seed)
    cov = np.array([[1.0, 0.6, 0.0], [0.6, 1.0, 0.3], [0.0, 0.3, 1.0]])
    x = rng.multivariate_normal([0.0, 5.0, -2.0], cov, size=n)
    out = {"a": x[:, 0], "b": x[:, 1], "c": x[:, 2]}
    for k, v in (shift or {}).items():
        out[k] = out[k] + v
    return out


TAILS = {"a": BOTH, "b": BOTH, "c": UPPER}


def test_the_combination_reaches_its_target_fpr_on_a_known_distribution():
    val = gaussian_stats(2000, seed=0)
    # fit_dose fits on one half and returns the scores of the other, which calibrate the threshold
    fit, scores, cal_idx = fit_dose(val, ["a", "b", "c"], tails=TAILS)
    assert len(scores) == len(cal_idx) == 1000
    threshold = calibrate_scores(scores, fpr=0.05)["threshold"]
    fresh = fit.score(gaussian_stats(10000, seed=1))
    assert abs((fresh > threshold).mean() - 0.05) < 0.015  # the threshold's own sampling error: ~0.7 pp


def test_two_sided_statistics_flag_both_tails_and_one_sided_only_one():
    sample = np.sort(np.random.default_rng(0).normal(size=2000))
    bw = 0.2
    hi, lo, mid = np.array([6.0]), np.array([-6.0]), np.array([0.0])
    both = [log10_tail(v, centres=sample, bandwidth=bw, tail=BOTH)[0] for v in (hi, lo, mid)]
    assert both[0] < -5 and both[1] < -5 and both[2] > -0.5  # far out on either side: tiny p
    up = [log10_tail(v, centres=sample, bandwidth=bw, tail=UPPER)[0] for v in (hi, lo)]
    assert up[0] < -5 and up[1] > -1e-3  # an upper-tail statistic does not mind small values
    z = normal_scores(np.array([-6.0, 6.0]), centres=sample, bandwidth=bw, tail=UPPER)
    assert z[0] == 0.0 and z[1] > 5
    val = gaussian_stats(1000, seed=0)
    fit = DoseFit.fit(val, ["a", "b", "c"], tails=TAILS)
    base = fit.score(gaussian_stats(1, seed=3))[0]
    assert fit.score(gaussian_stats(1, seed=3, shift={"a": 8.0}))[0] > base + 20
    assert fit.score(gaussian_stats(1, seed=3, shift={"a": -8.0}))[0] > base + 20
    assert fit.score(gaussian_stats(1, seed=3, shift={"c": -8.0}))[0] < base + 5  # c is upper-tail only


def test_the_explanation_names_the_statistic_that_crossed():
    val = gaussian_stats(1000, seed=0)
    fit = DoseFit.fit(val, ["a", "b", "c"], tails=TAILS)
    threshold = 20.0
    odd = gaussian_stats(1, seed=5, shift={"c": 9.0})
    lp, parts = fit.log10_p(odd)[0], fit.contributions(odd)[0]
    assert parts.sum() == pytest.approx(fit.score(odd)[0])
    e = explain({k: float(v[0]) for k, v in odd.items()}, lp, parts, fit, threshold)
    assert e["decided_by"] == ["c"] and e["statistics"]["c"]["crossed"] and e["most_extreme"] == "c"
    assert not e["statistics"]["a"]["crossed"] and e["statistics"]["c"]["p_value"] < 1e-6
    typical = gaussian_stats(1, seed=6)
    e = explain(
        {k: float(v[0]) for k, v in typical.items()},
        fit.log10_p(typical)[0],
        fit.contributions(typical)[0],
        fit,
        threshold,
    )
    assert e["decided_by"] == [] and not any(s["crossed"] for s in e["statistics"].values())


@pytest.mark.parametrize("neighbours", [0, 5])
def test_a_fit_survives_json(neighbours):
    val = gaussian_stats(500, seed=0)
    fit = DoseFit.fit(val, ["a", "b", "c"], tails=TAILS, neighbours=neighbours)
    again = DoseFit.from_json(json.loads(json.dumps(fit.to_json())))
    assert again.neighbours == neighbours and (again.reference is None) == (neighbours == 0)
    probe = gaussian_stats(50, seed=2)
    np.testing.assert_allclose(again.score(probe), fit.score(probe), rtol=1e-4)


def curved(n: int, seed: int) -> dict[str, np.ndarray]:
    """Two uncorrelated statistics that depend on each other: b = a^2 + noise (a curve, not an
    ellipse, as statistics of garments of different classes bend around each other)."""
    a = np.random.default_rng(seed).normal(size=n)
    return {"a": a, "b": a**2 + 0.1 * np.random.default_rng(seed + 100).normal(size=n)}


def test_nearest_neighbours_refuse_what_lies_off_the_in_distribution_curve():
    val, tails = curved(2000, seed=0), {"a": BOTH, "b": BOTH}
    off = {"a": np.array([0.0]), "b": np.array([4.0])}  # each value common, together never seen
    flagged = {}
    for k in (0, 5):
        fit, scores, _ = fit_dose(val, ["a", "b"], tails=tails, neighbours=k)
        threshold = calibrate_scores(scores, fpr=0.01)["threshold"]
        flagged[k] = bool(fit.score(off)[0] > threshold)
        fresh = fit.score(curved(5000, seed=1))
        assert (fresh > threshold).mean() < 0.02  # both keep their false-positive rate
    assert flagged == {0: False, 5: True}  # the ellipse holds the point; the neighbours see nothing near it


def test_leave_one_out_calibration_reaches_its_target_fpr():
    val = gaussian_stats(2000, seed=0)
    fit, scores, idx = fit_dose(val, ["a", "b", "c"], tails=TAILS, neighbours=5)
    assert len(scores) == 2000 and np.array_equal(idx, np.arange(2000)) and fit.neighbours == 5
    threshold = calibrate_scores(scores, fpr=0.05)["threshold"]
    fresh = fit.score(gaussian_stats(10000, seed=1))
    assert abs((fresh > threshold).mean() - 0.05) < 0.015  # the threshold's own sampling error: ~0.7 pp
    # no image is its own neighbour: its score is the one against a reference without it
    assert fit.reference is not None
    for i in (0, 17, 1999):
        rest = DoseFit(
            fit.statistics,
            fit.tails,
            fit.centres,
            fit.bandwidths,
            fit.mean,
            fit.precision,
            5,
            np.delete(fit.reference, i, axis=0),
        )
        assert rest.share(fit.reference[i : i + 1]).sum() == pytest.approx(scores[i], rel=1e-9)
        assert scores[i] > fit.share(fit.reference[i : i + 1]).sum()  # with itself at distance 0 it would score less
    with pytest.raises(ValueError, match="leave-one-out"):
        fit_dose(val, ["a"], tails=TAILS, neighbours=5, folds=5)
    with pytest.raises(ValueError, match="neighbours"):
        fit_dose({"a": val["a"][:8]}, ["a"], tails=TAILS, neighbours=5)


def test_the_neighbours_shares_sum_to_the_score_and_explain_it():
    val = gaussian_stats(1000, seed=0)
    fit = DoseFit.fit(val, ["a", "b", "c"], tails=TAILS, neighbours=5)
    odd = gaussian_stats(3, seed=5, shift={"c": 9.0})
    log10_p, parts = fit.explain_arrays(odd)
    np.testing.assert_allclose(parts.sum(axis=1), fit.score(odd))
    e = explain({k: float(v[0]) for k, v in odd.items()}, log10_p[0], parts[0], fit, 20.0)
    assert e["decided_by"] == ["c"] and e["statistics"]["c"]["crossed"]


def test_vae_terms_give_the_scored_iwae_estimate():
    torch.manual_seed(0)
    vae = VAE(VAEConfig(**TINY_VAE)).eval()
    x = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(vae_terms(vae, x, 1)["log_prob"], vae.iwae(x, 1))
        torch.testing.assert_close(vae_terms(vae, x, 3)["log_prob"], vae.iwae(x, 3))


def test_dose_through_the_scorer_is_the_calibrated_function():
    torch.manual_seed(0)
    scorer = Scorer(PixelCNN(PixelCNNConfig(**TINY_PIXELCNN)).eval(), weights_sha256="0" * 64)
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 40, size=(24, 1, 8, 8), dtype=np.uint8))
    cal = calibrate(scorer, x, data_spec="test", fpr=0.1, show_progress=False)
    assert cal["default_score"] == DOSE and DOSE in scorer.score_types
    assert cal["dose"]["neighbours"] == 5 and cal["dose"]["n_fit"] == cal["dose"]["n_threshold"] == 24
    got = scorer.compute(x[:4], None, [DOSE, NLL])
    offline = score_images(scorer, x[:4], names=[DOSE, NLL], show_progress=False)
    np.testing.assert_allclose(got.scores[DOSE].numpy(), offline[DOSE], rtol=1e-6)
    np.testing.assert_allclose(got.scores[NLL].numpy(), offline[NLL], rtol=1e-5)
    assert got.dose_contributions is not None and got.dose_contributions.shape == (4, 7)  # transpose is opt-in
    stats = model_statistics(scorer, x[:4])
    assert set(stats) == {"nll", "complexity", "flip", "border", "background", "pixel_top", "dark_nll"}
    # the flip statistic is antisymmetric: an image against its flip and the flip against the image
    flipped = model_statistics(scorer, x[:4].flip(2))
    torch.testing.assert_close(flipped["flip"], -stats["flip"], rtol=1e-4, atol=1e-4)


def test_kernel_tails_are_exact_from_the_bulk_to_far_outliers():
    centres = np.sort(np.random.default_rng(4).standard_t(3, size=3000))
    bw = silverman_bandwidth(centres)
    beyond = np.array([1.0, 3.0, 6.0, 8.0, 10.0, 15.0, 25.0, 35.0])  # bandwidths past the last centre
    values = np.concatenate(
        [np.linspace(-5.0, 5.0, 41), centres[-1] + bw * beyond, centres[0] - bw * beyond, [-1e3, 1e3]]
    )
    up, lo = ln_tails(values, centres=centres, bandwidth=bw)
    t = (torch.as_tensor(centres)[None, :] - torch.as_tensor(values)[:, None]) / bw  # the log-space reference
    ref_up = torch.logsumexp(torch.special.log_ndtr(t), dim=1) - np.log(len(centres))
    ref_lo = torch.logsumexp(torch.special.log_ndtr(-t), dim=1) - np.log(len(centres))
    np.testing.assert_allclose(up, ref_up.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lo, ref_lo.numpy(), rtol=1e-10, atol=1e-12)
    assert np.isfinite(up).all() and np.isfinite(lo).all() and up[-1] < -1e4  # far out: still ranked, no -inf


def test_one_kernel_pass_gives_the_same_tails_and_shares_as_two():
    rng = np.random.default_rng(3)
    stats = {"nll": rng.normal(size=300), "flip": rng.normal(size=300), "border": rng.uniform(size=300)}
    fit = DoseFit.fit(stats, ["nll", "flip", "border"])
    probe = {"nll": np.array([-9.0, 0.1, 4.0]), "flip": np.array([0.0, 7.0, -2.0]), "border": np.array([0.5, 0.9, 0.0])}
    log10_p, parts = fit.explain_arrays(probe)
    assert np.array_equal(log10_p, fit.log10_p(probe))
    assert np.array_equal(parts, fit.contributions(probe))


def test_cross_fitting_scores_every_image_out_of_fold_and_serves_the_fit_on_all():
    rng = np.random.default_rng(1)
    val = {"a": rng.normal(size=400), "b": rng.normal(size=400), "c": rng.uniform(size=400)}
    fit, scores, idx = fit_dose(val, ["a", "b", "c"], tails=TAILS, folds=4)
    assert len(scores) == 400 and np.array_equal(idx, np.arange(400))
    assert np.allclose(fit.score(val), DoseFit.fit(val, ["a", "b", "c"], tails=TAILS).score(val))
    # out-of-fold scores run higher than in-sample ones (no image judges itself)
    assert scores.mean() > fit.score(val).mean()
    with pytest.raises(ValueError, match="folds"):
        fit_dose(val, ["a"], tails=TAILS, folds=1)
