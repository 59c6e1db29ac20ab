"""Outlier scores, the scorer and calibration (models/scoring/), on constructed cases and tiny models."""

from __future__ import annotations

import io
import math
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.checkpoint import read_metadata, save_checkpoint, update_metadata
from models.pixelcnn import PixelCNN, PixelCNNConfig
from models.scoring.calibration import binomial_cdf, calibrate_scores, confident_rank, conformal_rank
from models.scoring.coders import code_length_bits, png_code_bits, webp_code_bits
from models.scoring.scorer import Scorer, load_scorer, stale_calibration
from models.scoring.scores import (
    COMPLEXITY,
    GUARD_WEIGHT,
    GUARDED,
    NLL,
    RATIO,
    complexity_score,
    guarded_score,
    likelihood_ratio_score,
    nll_score,
    pixel_anomaly,
)
from models.tools.score_sets import calibrate, score_images
from models.vae import VAE, VAEConfig
from tests.helpers import TINY_PIXELCNN, TINY_VAE, dataset_meta

D = 64  # 1 x 8 x 8


def tiny_pixelcnn(seed: int = 0) -> PixelCNN:
    torch.manual_seed(seed)
    return PixelCNN(PixelCNNConfig(**TINY_PIXELCNN)).eval()


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 8, 8), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


# ---- pure score functions ---------------------------------------------------------------------------


def test_scores_point_up_for_the_unlikely_and_are_in_bits_per_dim():
    lp = torch.tensor([-100.0, -200.0])
    nll = nll_score(lp, dims=D)
    assert nll[1] > nll[0] and nll[0].item() == pytest.approx(100 / (D * math.log(2)))
    # Same likelihood, but the second image is simpler (fewer PNG bits): it is the more surprising one.
    same = torch.tensor([-150.0, -150.0])
    cx = complexity_score(same, code_bits=torch.tensor([400.0, 100.0], dtype=torch.float64), dims=D)
    assert cx[1] > cx[0] and (cx[0] - cx[1]).item() == pytest.approx(-300 / D)
    # The ratio rises when the model likes an image less than the background model does ...
    lr = likelihood_ratio_score(lp, background_log_prob=torch.tensor([-150.0, -150.0]), dims=D)
    assert lr[0] < 0 < lr[1]
    # ... and a term both models share (the image's simplicity) cancels.
    shifted = likelihood_ratio_score(lp - 500.0, background_log_prob=torch.tensor([-650.0, -650.0]), dims=D)
    torch.testing.assert_close(shifted, lr)


def test_png_code_length_ranks_noise_above_a_constant():
    const = torch.full((1, 1, 8, 8), 7, dtype=torch.uint8)
    bits = png_code_bits(torch.cat([const, images(1)]))
    assert bits.shape == (2,) and bits.dtype == torch.float64
    assert 0 < bits[0] < bits[1]
    rgb = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    assert png_code_bits(rgb).shape == (2,)


def test_png_bits_are_the_zlib_stream_of_the_filtered_rows():
    x = images(1)
    buf = io.BytesIO()
    Image.fromarray(x[0, 0].numpy()).save(buf, format="PNG", optimize=True, compress_level=9)
    stream = buf.getvalue()
    idat = b"".join(
        stream[m.start() + 4 : m.start() + 4 + int.from_bytes(stream[m.start() - 4 : m.start()], "big")]
        for m in re.finditer(b"IDAT", stream)
    )
    assert png_code_bits(x)[0] == 8 * len(idat) < 8 * len(stream)
    assert len(zlib.decompress(idat)) == 8 * (8 + 1)  # one filter byte per row


def test_webp_bits_are_the_vp8l_bitstream():
    x = images(2)
    x[1] = 9
    bits = webp_code_bits(x)
    for im, b in zip(x, bits, strict=True):
        buf = io.BytesIO()
        Image.fromarray(im[0].numpy()).save(buf, format="WEBP", lossless=True, quality=100, method=4)
        n = int(b // 8)  # the file: RIFF header (12), chunk header (8), n bytes, a pad byte if n is odd
        assert len(buf.getvalue()) == 20 + n + n % 2 and buf.getvalue()[12:16] == b"VP8L"
    assert bits[1] < bits[0]
    assert webp_code_bits(torch.zeros(1, 3, 8, 8, dtype=torch.uint8)).shape == (1,)


def test_code_length_falls_back_to_the_raw_pixels():
    const = torch.full((1, 1, 8, 8), 7, dtype=torch.uint8)
    noise = images(1)
    bits = code_length_bits(torch.cat([const, noise]), levels=256)
    assert bits[0] == webp_code_bits(const)[0] + 1 < 64 * 8
    assert bits[1] == 64 * 8 + 1  # every coder expands noise; the raw image is shorter
    assert code_length_bits(noise.clamp(max=15), levels=16)[0] <= 64 * 4 + 1


def test_pixel_anomaly_shape_sign_and_background_correction():
    logp = torch.log(torch.rand(3, 2, 5, 4)).clamp(min=-20)
    nll = pixel_anomaly(logp)
    assert nll.shape == (3, 5, 4) and (nll >= 0).all()
    torch.testing.assert_close(nll, -logp.sum(1))
    assert pixel_anomaly(logp, background_pixel_log_prob=logp).abs().max() == 0


# ---- the scorer -------------------------------------------------------------------------------------


def test_scorer_autoregressive_shares_one_pass_and_matches_log_prob():
    model = tiny_pixelcnn()
    scorer = Scorer(model, tiny_pixelcnn(seed=1))
    assert scorer.score_types == [COMPLEXITY, GUARDED, RATIO, NLL]  # sorted names
    x = images()
    got = scorer.compute(x, None, [NLL, COMPLEXITY, RATIO], heatmap=True)
    with torch.no_grad():
        lp = model.log_prob(x)
    for name in (NLL, COMPLEXITY, RATIO):
        torch.testing.assert_close(got.log_prob[name], lp, rtol=1e-5, atol=1e-3)
        assert got.scores[name].shape == (4,) and got.heatmaps[name].shape == (4, 8, 8)
    torch.testing.assert_close(got.scores[NLL], nll_score(lp, dims=D), rtol=1e-5, atol=1e-5)
    # The NLL map is non-negative and adds up to the image's NLL; the ratio's map to the ratio.
    assert (got.heatmaps[NLL] >= 0).all()
    torch.testing.assert_close(got.heatmaps[NLL].flatten(1).sum(1), -lp, rtol=1e-4, atol=1e-2)
    ratio_nats = got.scores[RATIO] * D * math.log(2)
    torch.testing.assert_close(got.heatmaps[RATIO].flatten(1).sum(1).double(), ratio_nats, rtol=1e-4, atol=1e-2)


def test_ratio_against_itself_is_zero_and_unknown_types_are_refused():
    model = tiny_pixelcnn()
    scorer = Scorer(model, model)
    assert scorer.compute(images(), None, [RATIO]).scores[RATIO].abs().max() < 1e-9
    with pytest.raises(ValueError, match="unknown score type"):
        Scorer(model).compute(images(), None, [RATIO])  # no background model
    with pytest.raises(ValueError, match="background model takes"):
        Scorer(model, PixelCNN(PixelCNNConfig(**{**TINY_PIXELCNN, "height": 4})))


def test_vae_scores_use_the_scorers_k():
    torch.manual_seed(0)
    vae = VAE(VAEConfig(**TINY_VAE)).eval()
    scorer = Scorer(vae, vae_score_k=2)
    assert scorer.score_types == [COMPLEXITY, GUARDED, NLL]
    x = images()
    got = scorer.compute(x, None, [NLL, COMPLEXITY])
    with torch.no_grad():
        expected = vae.iwae(x, 2)
    for name in (NLL, COMPLEXITY):
        torch.testing.assert_close(got.log_prob[name], expected, rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="per-pixel"):
        scorer.compute(x, None, [NLL], heatmap=True)


def test_load_scorer_finds_the_background_companion(tmp_path: Path):
    save_checkpoint(tiny_pixelcnn(), tmp_path, dataset=dataset_meta())
    scorer, _ = load_scorer(tmp_path)
    assert scorer.background is None and RATIO not in scorer.score_types
    save_checkpoint(tiny_pixelcnn(1), tmp_path / "background", dataset=dataset_meta())
    scorer, meta = load_scorer(tmp_path)
    assert scorer.background is not None and RATIO in scorer.score_types
    assert scorer.weights_sha256 == meta["weights"]["sha256"] and scorer.background_sha256 and scorer.fingerprint


def test_new_weights_drop_the_calibration_and_stale_ones_are_detected(tmp_path: Path):
    save_checkpoint(tiny_pixelcnn(), tmp_path, dataset=dataset_meta())
    scorer, _ = load_scorer(tmp_path)
    cal = calibrate(scorer, images(20), data_spec="x", fpr=0.1, show_progress=False)
    meta = update_metadata(tmp_path, calibration=cal)
    assert stale_calibration(meta, None) is None
    assert stale_calibration(meta, {"weights": {"sha256": "f" * 64}}) == "it was computed with another background model"
    other = {**meta, "weights": {**meta["weights"], "sha256": "e" * 64}}
    assert stale_calibration(other, None) == "it was computed for other weights"
    png = {**meta, "calibration": {**cal, "coder": {"name": "png"}}}
    assert "used the coder 'png'" in str(stale_calibration(png, None))
    save_checkpoint(tiny_pixelcnn(), tmp_path, dataset=dataset_meta())  # the same weights: kept
    assert read_metadata(tmp_path)["calibration"] == cal
    save_checkpoint(tiny_pixelcnn(seed=5), tmp_path, dataset=dataset_meta())  # new weights: dropped
    assert read_metadata(tmp_path)["calibration"] is None


def test_score_images_caches_by_images(tmp_path: Path):
    scorer = Scorer(tiny_pixelcnn(), weights_sha256="0" * 64)
    x = images(5)
    a = score_images(scorer, x, batch_size=2, cache_dir=tmp_path, show_progress=False)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    b = score_images(scorer, x, batch_size=5, cache_dir=tmp_path, show_progress=False)
    np.testing.assert_array_equal(a[NLL], b[NLL])
    score_images(scorer, images(5, seed=1), cache_dir=tmp_path, show_progress=False)
    assert len(list(tmp_path.glob("*.npz"))) == 2


def tiny_conditional(seed: int = 0) -> PixelCNN:
    torch.manual_seed(seed)
    return PixelCNN(PixelCNNConfig(**TINY_PIXELCNN, n_classes=3)).eval()


def test_a_conditional_model_without_labels_scores_its_marginal_p_x(tmp_path: Path):
    model = tiny_conditional()
    prior = torch.tensor([0.2, 0.3, 0.5])
    scorer = Scorer(model, prior=prior, weights_sha256="0" * 64)
    x = images(6)
    got = scorer.compute(x, None, [NLL, COMPLEXITY])
    with torch.no_grad():
        per_class = torch.stack([model.log_prob(x, torch.full((6,), c)) for c in range(3)], dim=1)
    expected = torch.logsumexp(per_class.double() + prior.double().log(), dim=1)
    torch.testing.assert_close(got.log_prob[NLL].double(), expected, rtol=1e-5, atol=1e-3)
    assert got.class_log_likelihood is not None
    torch.testing.assert_close(got.class_log_likelihood, per_class, rtol=1e-5, atol=1e-3)
    labelled = scorer.compute(x, torch.full((6,), 1), [NLL])  # with labels: p(x|y)
    torch.testing.assert_close(labelled.log_prob[NLL], per_class[:, 1], rtol=1e-5, atol=1e-3)
    assert labelled.class_log_likelihood is None
    with pytest.raises(ValueError, match="a heatmap needs a label"):
        scorer.compute(x, None, [NLL], heatmap=True)
    assert scorer.compute(x, torch.zeros(6, dtype=torch.long), [NLL], heatmap=True).heatmaps[NLL].shape == (6, 8, 8)
    # the cache keeps the per-class likelihoods, and the prior is part of the key
    a = score_images(scorer, x, cache_dir=tmp_path, show_progress=False)
    other = Scorer(model, prior=torch.tensor([0.5, 0.3, 0.2]), weights_sha256="0" * 64)
    b = score_images(other, x, cache_dir=tmp_path, show_progress=False)
    assert len(list(tmp_path.glob("*.npz"))) == 2 and not np.allclose(a[NLL], b[NLL])
    with pytest.raises(ValueError, match="prior must be 3"):
        Scorer(model, prior=torch.tensor([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        Scorer(tiny_pixelcnn(), prior=torch.tensor([1.0]))


def test_a_conditional_model_is_calibrated_on_p_x_with_its_training_prior(tmp_path: Path):
    dataset = {**dataset_meta(["a", "b", "c"]), "class_counts": [1, 1, 2]}
    save_checkpoint(tiny_conditional(), tmp_path, dataset=dataset)
    scorer, _ = load_scorer(tmp_path)
    assert scorer.prior is not None and scorer.prior.tolist() == [0.25, 0.25, 0.5]
    with pytest.raises(ValueError, match="pass no labels"):
        calibrate(scorer, images(10), torch.zeros(10, dtype=torch.long), data_spec="x", show_progress=False)
    cal = calibrate(scorer, images(10), data_spec="x", fpr=0.2, show_progress=False)
    assert cal["prior"] == [0.25, 0.25, 0.5]
    meta = update_metadata(tmp_path, calibration=cal)
    assert stale_calibration(meta, None) is None
    changed = {**meta, "dataset": {**dataset, "class_counts": [1, 1, 1]}}
    assert stale_calibration(changed, None) == "it used another class prior p(y) than dataset.class_counts gives"


def test_the_guard_adds_the_nll_above_the_calibration_range_and_nothing_below(tmp_path: Path):
    c, n = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, 7.5, 5.0])
    assert guarded_score(c, n, nll_cap=5.0).tolist() == [1.0, -2.0 + GUARD_WEIGHT * 2.5, 0.5]
    assert torch.equal(guarded_score(c, n, nll_cap=None), c)  # uncalibrated: complexity
    save_checkpoint(tiny_pixelcnn(), tmp_path, dataset=dataset_meta())
    scorer, _ = load_scorer(tmp_path)
    dark = torch.randint(0, 32, (30, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    cal = calibrate(scorer, dark, data_spec="x", fpr=0.1, show_progress=False)
    val = score_images(scorer, dark, show_progress=False)
    assert cal["nll_cap"] == pytest.approx(float(val[NLL].max())) and scorer.nll_cap == cal["nll_cap"]
    np.testing.assert_allclose(val[GUARDED], val[COMPLEXITY])  # on its own calibration data: complexity
    update_metadata(tmp_path, calibration=cal)
    loaded, _ = load_scorer(tmp_path)
    assert loaded.nll_cap == cal["nll_cap"]
    x = images(8)
    got = score_images(loaded, x, show_progress=False)
    expected = got[COMPLEXITY] + GUARD_WEIGHT * np.maximum(0.0, got[NLL] - cal["nll_cap"])
    np.testing.assert_allclose(got[GUARDED], expected)


# ---- calibration ------------------------------------------------------------------------------------


def test_conformal_rank():
    assert conformal_rank(5000, 0.01) == 4951  # 49 of 5,000 above: a fresh image exceeds it w.p. 50/5001
    assert conformal_rank(99, 0.01) == 99
    assert conformal_rank(10, 0.5) == 6
    with pytest.raises(ValueError, match="false-positive rate"):
        conformal_rank(10, 1.5)


@pytest.mark.parametrize("fpr", [0.01, 0.05])
def test_calibration_reaches_the_target_fpr_on_a_known_distribution(fpr: float):
    rng = np.random.default_rng(0)
    cal = calibrate_scores(rng.gumbel(2.0, 0.5, size=20_000), fpr=fpr)
    fresh = rng.gumbel(2.0, 0.5, size=400_000)
    observed = float((fresh > cal["threshold"]).mean())
    assert observed == pytest.approx(fpr, abs=0.15 * fpr)  # sampling error of a 20,000-image calibration
    exact = 2.0 - 0.5 * math.log(-math.log(1 - fpr))  # the Gumbel quantile
    assert cal["threshold"] == pytest.approx(exact, abs=0.05)
    q = cal["quantiles"]
    assert len(q) == 101 and q == sorted(q) and cal["fpr_on_calibration"] <= fpr


def test_calibrate_writes_every_score_type_and_the_default():
    scorer = Scorer(tiny_pixelcnn(), tiny_pixelcnn(1))
    cal = calibrate(scorer, images(40), data_spec="npz:x", fpr=0.1, show_progress=False)
    assert cal["default_score"] == "dose" and cal["n"] == 40 and cal["target_fpr"] == 0.1
    assert sorted(cal["scores"]) == sorted([COMPLEXITY, GUARDED, RATIO, NLL, "dose"])
    for entry in cal["scores"].values():
        assert entry["fpr_on_calibration"] <= 0.1 and len(entry["quantiles"]) == 101
    with pytest.raises(ValueError, match="unknown score type"):
        calibrate(Scorer(tiny_pixelcnn()), images(4), data_spec="x", default=RATIO, show_progress=False)


# ---- thresholds with a confidence -------------------------------------------------------------------


def test_a_confident_threshold_keeps_its_rate_below_the_target_nine_times_in_ten():
    """Uniform scores: a threshold t flags 1 - t of fresh ones, so its true rate is known exactly."""
    rng = np.random.default_rng(0)
    n, fpr, draws = 500, 0.05, 2000
    k_conf, k_conf_rank = confident_rank(n, fpr, 0.9), conformal_rank(n, fpr)
    assert k_conf > k_conf_rank  # a higher threshold than the conformal one
    samples = np.sort(rng.uniform(size=(draws, n)), axis=1)
    rate_conf = 1.0 - samples[:, k_conf - 1]
    rate_conformal = 1.0 - samples[:, k_conf_rank - 1]
    exact = binomial_cdf(n - k_conf, n, fpr)  # P(true rate > fpr): at most 0.1, as close as the ranks allow
    assert 0.05 < exact <= 0.1
    assert abs((rate_conf > fpr).mean() - exact) < 3 * np.sqrt(exact * (1 - exact) / draws)
    assert abs(rate_conformal.mean() - fpr) < 0.003 and (rate_conformal > fpr).mean() > 0.3
    entry = calibrate_scores(samples[0], fpr=fpr, confidence=0.9)
    assert entry["threshold"] == samples[0, k_conf - 1] and entry["above"] == n - k_conf
    assert entry["confidence"] == 0.9


def test_confident_rank_known_values_and_small_samples():
    assert confident_rank(2500, 0.01, 0.9) == 2500 - 18  # P(Binomial(2500, 0.01) <= 18) <= 0.1 < P(... <= 19)
    assert binomial_cdf(18, 2500, 0.01) <= 0.1 < binomial_cdf(19, 2500, 0.01)
    assert confident_rank(100, 0.01, 0.9) == 100  # too few scores for the confidence: the largest
    with pytest.raises(ValueError, match="confidence"):
        confident_rank(100, 0.01, 1.0)
