"""VAE: decoder normalisation, IWAE versus ELBO, deterministic batch-invariant log_prob, sampling."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from models.likelihood import discretized_logistic_mixture_probs, to_unit_range
from models.vae import VAE, VAEConfig


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and do not stall when other jobs share the CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(seed: int = 0, **overrides: Any) -> VAE:
    cfg: dict[str, Any] = {
        "in_channels": 1, "height": 4, "width": 4, "levels": 16, "latent_dim": 4, "hidden": 8,
        "downsample": 1, "res_blocks": 1, "n_mixtures": 2, "iwae_samples": 16, "iwae_chunk": 16,
    }  # fmt: skip
    cfg.update(overrides)
    torch.manual_seed(seed)
    return VAE(VAEConfig(**cfg)).eval()


def images(n: int, c: int = 1, h: int = 4, w: int = 4, levels: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, levels, (n, c, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_encode_returns_mean_and_positive_std() -> None:
    model = tiny(latent_dim=5)
    with torch.no_grad():
        mean, std = model.encode(images(3))
    assert mean.shape == (3, 5) and std.shape == (3, 5)
    assert (std > 0).all() and torch.isfinite(mean).all()


def test_image_size_must_fit_the_downsampling() -> None:
    with pytest.raises(ValueError, match="divisible"):
        VAE(VAEConfig(height=6, width=4, downsample=2))


# -- decoder likelihood --------------------------------------------------------------------------


def test_decoder_distribution_sums_to_one_over_all_images() -> None:
    model = tiny(height=2, width=2, levels=3, n_mixtures=3)
    x = torch.tensor(list(itertools.product(range(3), repeat=4)), dtype=torch.uint8).view(-1, 1, 2, 2)
    z = torch.randn(1, 4, generator=torch.Generator().manual_seed(0)) * 2
    with torch.no_grad():
        total = model.decoder_log_prob(x, z.expand(len(x), 4)).double().exp().sum()
    assert total.item() == pytest.approx(1.0, abs=1e-5)


def test_decoder_per_pixel_probabilities_sum_to_one_and_match_decoder_log_prob() -> None:
    model = tiny(in_channels=3, levels=256)
    z = torch.randn(2, 4, generator=torch.Generator().manual_seed(1)) * 3
    x = images(2, c=3, levels=256)
    with torch.no_grad():
        w, m, s = model.decoder(z)
        assert w.shape == m.shape == s.shape == (2, 3, 2, 4, 4)
        probs = discretized_logistic_mixture_probs(logit_weights=w, means=m, log_scales=s, levels=256)
        torch.testing.assert_close(probs.sum(2), torch.ones(2, 3, 4, 4), rtol=0, atol=1e-4)
        picked = probs.gather(2, x.long().unsqueeze(2)).squeeze(2).log().flatten(1).sum(1)
        torch.testing.assert_close(model.decoder_log_prob(x, z), picked, rtol=1e-5, atol=1e-3)


# -- IWAE and ELBO -------------------------------------------------------------------------------


def test_iwae_is_at_least_the_elbo_on_the_same_samples() -> None:
    model = tiny()
    x = images(8)
    with torch.no_grad():
        for k in (1, 4, 16, 64):
            iwae, elbo = model.iwae(x, k), model.elbo(x, k)
            assert iwae.shape == elbo.shape == (8,)
            assert (iwae >= elbo - 1e-4).all(), k  # Jensen, per image
        torch.testing.assert_close(model.iwae(x, 1), model.elbo(x, 1))
        assert model.iwae(x, 64).mean() > model.elbo(x, 64).mean()


def test_iwae_increases_with_k_on_average() -> None:
    # A wide q(z|x) and a decoder that depends strongly on z make the importance weights spread
    # out, so the expected gain from more samples is far above the noise of 48 noise seeds.
    model = tiny()
    with torch.no_grad():
        model.encoder.head.bias[4:] = 4.0  # log-variance: std ~7 against the N(0, 1) prior
        model.decoder.fc.weight.mul_(3.0)
    x = images(8)
    ks = (1, 4, 16, 64)
    totals = torch.zeros(len(ks), dtype=torch.float64)
    seeds = 48
    with torch.no_grad():
        for seed in range(seeds):
            model.config.iwae_seed = seed
            totals += torch.tensor([model.iwae(x, k).double().mean().item() for k in ks])
    means = totals / seeds
    assert (means.diff() > 0).all(), means.tolist()


def test_importance_samples_do_not_depend_on_chunking() -> None:
    x = images(3)
    with torch.no_grad():
        one = tiny(iwae_chunk=64).log_weights(x, 24)
        chunked = tiny(iwae_chunk=5).log_weights(x, 24)
    assert one.shape == (3, 24)
    torch.testing.assert_close(one, chunked, rtol=1e-5, atol=1e-4)


def test_training_objective_is_an_unbiased_negative_elbo() -> None:
    # training_step uses the analytic KL and one reparameterised sample; log_weights uses Monte
    # Carlo log p(z) - log q(z|x). Both estimate the same ELBO.
    model = tiny()
    x = images(2)
    reps = 1024
    xr = x.repeat_interleave(reps, dim=0)
    torch.manual_seed(0)
    with torch.no_grad():
        nll = model.training_step(xr).nll.view(2, reps).double()
        step = model.training_step(x)
        elbo = model.elbo(x, 2048).double()
    stderr = nll.std(1) / math.sqrt(reps)
    assert ((-nll.mean(1) - elbo).abs() < 4 * stderr + 0.05).all(), (-nll.mean(1), elbo, stderr)
    torch.testing.assert_close(step.loss, step.nll.mean() / model.dims)


# -- log_prob ------------------------------------------------------------------------------------


def test_log_prob_is_deterministic_and_batch_invariant() -> None:
    model = tiny(iwae_samples=32, iwae_chunk=8)
    x = images(5)
    with torch.no_grad():
        a = model.log_prob(x)
        b = model.log_prob(x)
        alone = torch.cat([model.log_prob(x[i : i + 1]) for i in range(5)])
        mixed = model.log_prob(torch.cat([x[2:3], images(7, seed=9)]))[0]
    assert a.shape == (5,)
    assert torch.equal(a, b)
    torch.testing.assert_close(alone, a, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(mixed, a[2], rtol=1e-5, atol=1e-4)
    assert (a < 0).all()


@pytest.mark.parametrize("context_layers", [0, 1])
def test_prepare_for_inference_changes_only_the_layout(context_layers: int) -> None:
    model = tiny(decoder_context=3 if context_layers else 0, context_layers=context_layers)
    x = images(6, seed=3)
    with torch.no_grad():
        before = (model.log_prob(x), model.elbo(x), model.sample(2, generator=torch.Generator().manual_seed(1)).images)
        model.prepare_for_inference()
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
        after = (model.log_prob(x), model.elbo(x), model.sample(2, generator=torch.Generator().manual_seed(1)).images)
    torch.testing.assert_close(after[0], before[0], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(after[1], before[1], rtol=1e-5, atol=1e-3)
    assert torch.equal(after[2], before[2])


def test_log_prob_uses_iwae_samples_and_seed_from_the_config() -> None:
    model = tiny(iwae_samples=8)
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(model.log_prob(x), model.iwae(x, 8))
        before = model.log_prob(x)
        model.config.iwae_seed = 1
        assert not torch.equal(model.log_prob(x), before)


def test_labels_are_rejected() -> None:
    model = tiny()
    with pytest.raises(ValueError, match="not class-conditional"):
        model.log_prob(images(2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="not class-conditional"):
        model.sample(2, y=torch.tensor([0, 1]))


def test_wrong_shape_float_or_out_of_range_images_are_rejected() -> None:
    model = tiny()  # 16 levels
    with pytest.raises(ValueError, match="shape"):
        model.log_prob(images(2, h=8))
    with pytest.raises(ValueError, match="integer"):
        model.log_prob(images(2).float())
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        model.log_prob(images(2, levels=256, seed=1))  # 8-bit values given to a 4-bit model


# -- sampling ------------------------------------------------------------------------------------


def test_sampling_is_reproducible_and_well_formed() -> None:
    model = tiny(in_channels=3, levels=7)
    a = model.sample(5, generator=torch.Generator().manual_seed(3))
    b = model.sample(5, generator=torch.Generator().manual_seed(3))
    c = model.sample(5, generator=torch.Generator().manual_seed(4))
    assert a.images.shape == (5, 3, 4, 4) and a.images.dtype == torch.uint8
    assert int(a.images.max()) < 7
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)
    assert a.log_prob is None  # a VAE has no exact likelihood of its samples


@pytest.mark.parametrize("temperature", [0.0, -1.0, 1e-4, 1e4, 1e39, float("nan")])
def test_temperature_out_of_range_raises(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        tiny().sample(1, temperature=temperature)


# -- local-context (PixelVAE-style) decoder --------------------------------------------------------


def _context_vae(channels: int = 1, height: int = 2, width: int = 2, layers: int = 0) -> VAE:
    torch.manual_seed(0)
    cfg = VAEConfig(
        in_channels=channels, height=height, width=width, levels=3, latent_dim=2, hidden=4,
        downsample=1, n_mixtures=2, decoder_context=3, context_layers=layers,
    )  # fmt: skip
    model = VAE(cfg).eval()
    with torch.no_grad():  # the context path starts as a no-op; give it weight so the tests see it
        model.decoder.ctx_out.weight.normal_(0.0, 1.0)
    return model


@pytest.mark.parametrize(("channels", "layers"), [(1, 0), (2, 0), (1, 2), (2, 1)])
def test_context_decoder_is_normalised(channels: int, layers: int) -> None:
    model = _context_vae(channels, layers=layers)
    d = channels * 4
    images = torch.tensor(list(itertools.product(range(3), repeat=d))).view(-1, channels, 2, 2)
    z = torch.randn(1, 2).expand(len(images), 2)
    with torch.no_grad():
        total = model.decoder_log_prob(images, z).exp().sum()
    assert abs(float(total) - 1.0) < 1e-4


@pytest.mark.parametrize("layers", [0, 2])
def test_context_sampler_draws_from_the_decoder_distribution(layers: int) -> None:
    model = _context_vae(1, 2, 2, layers)
    model.config.height, model.config.width = 2, 2
    z = torch.randn(1, 2)
    n = 6000
    with torch.no_grad():
        draws = model._sample_context(z.expand(n, 2), torch.Generator().manual_seed(0), None)
        images = torch.tensor(list(itertools.product(range(3), repeat=4))).view(-1, 1, 2, 2)
        probs = model.decoder_log_prob(images, z.expand(len(images), 2)).exp()
    codes = (draws.view(n, 4).long() * torch.tensor([27, 9, 3, 1])).sum(1)
    freq = torch.bincount(codes, minlength=81).float() / n
    assert float((freq - probs).abs().max()) < 0.03


@pytest.mark.parametrize(("channels", "layers"), [(1, 0), (1, 2), (3, 1)])
def test_context_window_equals_the_full_pass(channels: int, layers: int) -> None:
    """The sampler's windowed context (zero padding emulated per layer) matches the full pass."""
    model = _context_vae(channels, 4, 6, layers)
    with torch.no_grad():
        for p in model.decoder.parameters():  # biases too: they are what the padding emulation guards
            p.normal_(0.0, 0.5)
    dec, r = model.decoder, model.decoder.context_radius
    x = torch.rand(3, channels, 4, 6) * 2 - 1
    xpad = torch.nn.functional.pad(x, (r, r, r, r))
    with torch.no_grad():
        full = dec.context(x)
        for i in range(4):
            for j in range(6):
                at = dec.context_at(xpad[:, :, i : i + 2 * r + 1, j : j + 2 * r + 1], dec.window_inside(i, j))
                torch.testing.assert_close(at[:, :, 0, 0], full[:, :, i, j], atol=1e-5, rtol=1e-5)


def test_context_layers_are_causal_and_widen_the_window() -> None:
    """Each extra layer reads one pixel further; nothing at or after the current sub-pixel is read."""
    model = _context_vae(1, 8, 8, layers=2)
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.normal_(0.0, 0.5)
    x = torch.zeros(1, 1, 8, 8, requires_grad=True)
    out = model.decoder.context(x)[0, :, 3, 3].sum()
    (grad,) = torch.autograd.grad(out, x)
    seen = grad[0, 0] != 0
    r = model.decoder.context_radius
    assert r == 3
    for i in range(8):
        for j in range(8):
            earlier = i < 3 or (i == 3 and j < 3)
            within = 3 - i <= r and abs(j - 3) <= r
            if not (earlier and within):
                assert not seen[i, j], (i, j)
    assert not seen[0, 7] and not seen[3, 3]
    assert seen[0, 0] and seen[0, 6] and seen[3, 0], "the window reaches r pixels up and to both sides"


def test_iwae_reuses_the_context_features() -> None:
    """log_weights computes the image's context once; the result equals decoding each copy."""
    model = _context_vae(1, 4, 4, layers=1)
    x = torch.randint(0, 3, (2, 1, 4, 4))
    with torch.no_grad():
        lw = model.log_weights(x, 3)
        gen = torch.Generator().manual_seed(model.config.iwae_seed)
        eps = torch.randn(3, 2, generator=gen)
        mean, logvar = model.encoder(to_unit_range(x, 3))
        z = mean[:, None] + torch.exp(0.5 * logvar)[:, None] * eps[None]
        direct = torch.stack([model.decoder_log_prob(x, z[:, k]) for k in range(3)], dim=1)
        log_pz = (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_q = (-0.5 * eps.pow(2) - 0.5 * math.log(2 * math.pi)).sum(-1)[None] - logvar.sum(1, keepdim=True) / 2
    torch.testing.assert_close(lw, direct + log_pz - log_q, atol=1e-4, rtol=1e-5)


def test_log_weights_shares_a_batch_out_by_images_without_changing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """On several torch threads, without gradients, the batch is split over them (one torch thread
    per share); every image's weights equal the whole batch's on one thread. Not with gradients,
    and not for fewer images than threads."""
    import models.vae as vae_module

    model, x = tiny(decoder_context=3), images(7)
    with torch.no_grad():
        whole = model.log_weights(x, 16)  # one thread (the fixture): no split
    shares: list[tuple[int, int]] = []
    real = vae_module.split_batch

    def spy(fn: Any, n: int, workers: int) -> None:
        shares.append((n, workers))
        real(fn, n, workers)

    monkeypatch.setattr(vae_module, "split_batch", spy)
    torch.set_num_threads(3)
    with torch.inference_mode():
        split = model.log_weights(x, 16)
        assert model.log_weights(x[:2], 16).shape == (2, 16)  # 2 images, 3 threads: whole
    assert shares == [(7, 3)]
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-4)
    assert split.dtype == whole.dtype
    train = model.log_weights(x, 16)  # gradients on: one batch, so autograd sees one graph
    assert train.requires_grad and shares == [(7, 3)]
    torch.testing.assert_close(train.detach(), whole, rtol=1e-5, atol=1e-4)
