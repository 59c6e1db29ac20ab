"""Variational autoencoder: Kingma & Welling 2014, "Auto-Encoding Variational Bayes".

Encoder q(z|x) = N(mu(x), diag sigma(x)^2), prior p(z) = N(0, I), decoder p(x|z) a discretised
mixture of logistics per sub-pixel (Salimans et al. 2017), so the decoder assigns a true
probability to each of the ``levels`` values and the ELBO is a bound on log p(x) of the discrete
image in the same nats as PixelCNN's. ``log_prob`` is the importance-weighted estimate of Burda et
al. 2016 ("Importance Weighted Autoencoders") with k samples: a stochastic lower bound on log p(x)
in expectation, tighter than the ELBO and made deterministic by a fixed noise seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import DensityModel, SampleOutput, TrainStep
from models.likelihood import (
    discretized_logistic_mixture_log_prob,
    sample_discretized_logistic_mixture,
    to_unit_range,
)


@dataclass
class VAEConfig:
    in_channels: int = 1
    height: int = 28
    width: int = 28
    levels: int = 256  # discrete values per sub-pixel (8-bit images)
    latent_dim: int = 32
    hidden: int = 64
    downsample: int = 2  # stride-2 stages; height and width must be divisible by 2**downsample
    res_blocks: int = 1  # residual blocks per stage
    n_mixtures: int = 5  # logistic components per sub-pixel in the decoder
    iwae_samples: int = 128  # k for log_prob
    iwae_seed: int = 0  # fixes the importance samples, so log_prob is deterministic
    iwae_chunk: int = 32  # importance samples decoded at once (bounds memory)


class ResBlock(nn.Module):
    """x + conv(elu(conv(elu(x)))), shape preserving."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.c2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.c2(F.elu(self.c1(F.elu(x))))


class Encoder(nn.Module):
    """(B, C, H, W) in [-1, 1] -> mean and log-variance of q(z|x), each (B, latent_dim)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        h = cfg.hidden
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, h, 3, padding=1)]
        for _ in range(cfg.downsample):
            layers += [ResBlock(h) for _ in range(cfg.res_blocks)]
            layers += [nn.ELU(), nn.Conv2d(h, h, 4, stride=2, padding=1)]
        layers += [ResBlock(h) for _ in range(cfg.res_blocks)] + [nn.ELU()]
        self.net = nn.Sequential(*layers)
        f = 2**cfg.downsample
        self.head = nn.Linear(h * (cfg.height // f) * (cfg.width // f), 2 * cfg.latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, logvar = self.head(self.net(x).flatten(1)).chunk(2, dim=1)
        return mean, logvar.clamp(-12.0, 8.0)


class Decoder(nn.Module):
    """z (B, latent_dim) -> mixture parameters, each (B, C, K, H, W)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        h, f = cfg.hidden, 2**cfg.downsample
        self.cfg = cfg
        self.h0, self.w0 = cfg.height // f, cfg.width // f
        self.fc = nn.Linear(cfg.latent_dim, h * self.h0 * self.w0)
        layers: list[nn.Module] = []
        for _ in range(cfg.downsample):
            layers += [ResBlock(h) for _ in range(cfg.res_blocks)]
            layers += [nn.ELU(), nn.ConvTranspose2d(h, h, 4, stride=2, padding=1)]
        layers += [ResBlock(h) for _ in range(cfg.res_blocks)] + [nn.ELU()]
        layers += [nn.Conv2d(h, cfg.in_channels * 3 * cfg.n_mixtures, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        cfg = self.cfg
        out = self.net(self.fc(z).view(z.shape[0], -1, self.h0, self.w0))
        out = out.view(z.shape[0], cfg.in_channels, 3, cfg.n_mixtures, cfg.height, cfg.width)
        logit_weights, means, log_scales = out.unbind(2)
        return logit_weights, torch.tanh(means) * 1.1, log_scales


class VAE(DensityModel):
    """VAE over (C, H, W) images with a discrete decoder likelihood."""

    kind = "vae"
    architecture = "vae"
    exact = False

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        if config.height % 2**config.downsample or config.width % 2**config.downsample:
            raise ValueError("height and width must be divisible by 2**downsample")
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and standard deviation of q(z|x), each (B, latent_dim)."""
        self.check_input(x)
        mean, logvar = self.encoder(to_unit_range(x, self.levels))
        return mean, torch.exp(0.5 * logvar)

    def decoder_log_prob(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x|z) in nats, (B,): x (B, C, H, W) integers, z (B, latent_dim)."""
        w, m, s = self.decoder(z)
        return (
            discretized_logistic_mixture_log_prob(x, logit_weights=w, means=m, log_scales=s, levels=self.levels)
            .flatten(1)
            .sum(1)
        )

    def training_step(self, x: Tensor, y: Tensor | None = None) -> TrainStep:
        """Negative ELBO with one reparameterised sample: E_q[-log p(x|z)] + KL(q(z|x) || N(0, I))."""
        self.check_input(x)
        mean, logvar = self.encoder(to_unit_range(x, self.levels))
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        rec = self.decoder_log_prob(x, z)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)
        nll = kl - rec  # -ELBO in nats, (B,)
        return TrainStep(loss=nll.mean() / self.dims, nll=nll.detach())

    def log_weights(self, x: Tensor, k: int) -> Tensor:
        """log p(x, z_k) - log q(z_k|x) for k fixed importance samples, shape (B, k), nats.

        The standard-normal noise (k, latent_dim) comes from ``iwae_seed`` and is shared by every
        image, so each image's estimate depends on that image alone, not on its batch.
        """
        self.check_input(x)
        cfg = self.config
        gen = torch.Generator(device="cpu").manual_seed(cfg.iwae_seed)
        eps = torch.randn(k, cfg.latent_dim, generator=gen).to(x.device)
        mean, logvar = self.encoder(to_unit_range(x, cfg.levels))
        std = torch.exp(0.5 * logvar)
        b = x.shape[0]
        out = []
        for start in range(0, k, cfg.iwae_chunk):
            e = eps[start : start + cfg.iwae_chunk]  # (k', D)
            kc = e.shape[0]
            z = mean[:, None] + std[:, None] * e[None]  # (B, k', D)
            log_q = (-0.5 * e.pow(2) - 0.5 * math.log(2 * math.pi))[None].sum(-1) - logvar.sum(1, keepdim=True) / 2
            log_pz = (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).sum(-1)
            xr = x[:, None].expand(b, kc, *x.shape[1:]).reshape(b * kc, *x.shape[1:])
            log_px = self.decoder_log_prob(xr, z.reshape(b * kc, -1)).view(b, kc)
            out.append(log_px + log_pz - log_q)
        return torch.cat(out, dim=1)

    def iwae(self, x: Tensor, k: int | None = None) -> Tensor:
        """Importance-weighted estimate log (1/k) sum_k w_k in nats, (B,); k=1 gives an ELBO sample."""
        k = k or self.config.iwae_samples
        lw = self.log_weights(x, k)
        return torch.logsumexp(lw, dim=1) - math.log(k)

    def elbo(self, x: Tensor, k: int | None = None) -> Tensor:
        """The evidence lower bound in nats, (B,), estimated on the same k samples as ``iwae``."""
        return self.log_weights(x, k or self.config.iwae_samples).mean(1)

    def log_prob(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """IWAE estimate of log p(x) in nats, (B,), with ``iwae_samples`` importance samples."""
        self.check_input(x, y)  # rejects labels: this model is unconditional
        return self.iwae(x)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        y: Tensor | None = None,
    ) -> SampleOutput:
        """Decode prior draws z ~ N(0, temperature^2 I); the likelihood of a VAE sample is not exact."""
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        self.check_labels(n, y)
        dev = self.device
        z = torch.randn(n, self.config.latent_dim, generator=generator, device=dev) * temperature
        w, m, s = self.decoder(z)
        x = sample_discretized_logistic_mixture(
            logit_weights=w, means=m, log_scales=s, levels=self.levels, generator=generator
        )
        return SampleOutput(images=x, log_prob=None)
