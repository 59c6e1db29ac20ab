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

from models.base import DensityModel, RowCallback, SampleOutput, TrainStep, check_temperature
from models.layers import CausalConv2d, Conv1x1
from models.likelihood import (
    discretized_logistic_mixture_log_prob,
    sample_discretized_logistic_mixture,
    to_unit_range,
)
from models.threads import split_batch, torch_threads


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
    # > 0: PixelVAE-style local autoregression (Gulrajani et al. 2017): p(x_i | z, x_<i in a k x k
    # window) with k = decoder_context, so the decoder models local pixel correlations itself.
    decoder_context: int = 0
    # Residual 3 x 3 masked (mask B) layers on top of the k x k context conv: each widens the window
    # the decoder sees by one pixel on every side (rows above and columns left and right).
    context_layers: int = 0


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
    """z (B, latent_dim) [and x for a local-context decoder] -> mixture parameters (B, C, K, H, W) each."""

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
        if cfg.decoder_context:
            if cfg.decoder_context % 2 == 0:
                raise ValueError("decoder_context must be odd")
            n_out = cfg.in_channels * 3 * cfg.n_mixtures
            self.ctx = CausalConv2d(cfg.in_channels, h, cfg.decoder_context, cfg.in_channels)
            self.ctx_layers = nn.ModuleList(
                [CausalConv2d(h, h, 3, cfg.in_channels, include_own=True) for _ in range(cfg.context_layers)]
            )
            self.ctx_mix = nn.Conv2d(h, h, 1)  # z features into the context path
            self.ctx_out = Conv1x1(h, n_out, cfg.in_channels)  # pointwise: keeps the mask's causality
            # Starts at zero: the context path begins as a no-op, so a factorised VAE can be extended.
            nn.init.zeros_(self.ctx_out.weight)

    def features(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        """The z-only part: (output from z (B, C*3K, H, W), z features for the context path or None)."""
        feat = self.net[:-1](self.fc(z).view(z.shape[0], -1, self.h0, self.w0))
        return self.net[-1](feat), (self.ctx_mix(feat) if self.cfg.decoder_context else None)

    @property
    def context_radius(self) -> int:
        """How far (rows up, columns either side) the context path reads from the current pixel."""
        return self.cfg.decoder_context // 2 + self.cfg.context_layers

    def context(self, x_unit: Tensor) -> Tensor:
        """The image-only part of a local-context decoder: (B, C, H, W) in [-1, 1] -> (B, hidden, H, W).

        It does not depend on z, so the importance-weighted estimate computes it once per image.
        """
        c = self.ctx(x_unit)
        for layer in self.ctx_layers:
            c = c + layer(F.elu(c))
        return c

    def window_inside(self, i: int, j: int, device: torch.device | None = None) -> Tensor:
        """(2r+1, 2r+1) float mask of the window centred on pixel (i, j): 1 where it lies in the image."""
        r = self.context_radius
        offsets = torch.arange(-r, r + 1, device=device)
        rows = (i + offsets >= 0) & (i + offsets < self.cfg.height)
        cols = (j + offsets >= 0) & (j + offsets < self.cfg.width)
        return (rows[:, None] & cols[None, :]).float()

    def context_at(self, window: Tensor, inside: Tensor) -> Tensor:
        """:meth:`context` at one pixel from the (2r+1) x (2r+1) window of the zero-padded image
        centred on it (r = :attr:`context_radius`): (n, C, 2r+1, 2r+1) -> (n, hidden, 1, 1).

        ``inside`` (:meth:`window_inside`) is 1 where the window lies in the image: features outside it are
        zeroed after every layer, which is what the full pass's zero padding does, so the result
        equals the full pass at that pixel.
        """
        p = self.cfg.decoder_context // 2
        c = self.ctx(window, pad=False)
        m = inside[p : inside.shape[0] - p, p : inside.shape[1] - p]
        c = c * m
        for layer in self.ctx_layers:
            c = c[:, :, 1:-1, 1:-1] + layer(F.elu(c), pad=False)
            m = m[1:-1, 1:-1]
            c = c * m
        return c

    def params(self, base: Tensor, mix: Tensor | None, ctx: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Mixture parameters from :meth:`features` and, for a local-context decoder, :meth:`context`."""
        cfg = self.cfg
        out = base
        if mix is not None:
            assert ctx is not None, "a local-context decoder needs the image's context features"
            out = out + self.ctx_out(F.elu(ctx + mix))
        out = out.reshape(out.shape[0], cfg.in_channels, 3, cfg.n_mixtures, out.shape[-2], out.shape[-1])
        logit_weights, means, log_scales = out.unbind(2)
        return logit_weights, torch.tanh(means) * 1.1, log_scales

    def forward(self, z: Tensor, x_unit: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        base, mix = self.features(z)
        return self.params(base, mix, self.context(x_unit) if mix is not None and x_unit is not None else None)


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

    def prepare_for_inference(self, *, cuda_graphs: bool = False, compile: bool = False) -> None:
        """Channels-last on CPU, where the encoder's and decoder's convolutions run faster in it
        (docs/serving.md); IWAE and ELBO stay equal up to float rounding. A VAE samples in one
        decoder pass (or a context decoder's loop), so ``cuda_graphs`` changes nothing here, and its
        likelihood is not compiled (not measured yet), so neither does ``compile``."""
        if self.device.type == "cpu":
            self.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # (untyped overload)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and standard deviation of q(z|x), each (B, latent_dim)."""
        self.check_input(x)
        mean, logvar = self.encoder(to_unit_range(x, self.levels))
        return mean, torch.exp(0.5 * logvar)

    def decoder_log_prob(self, x: Tensor, z: Tensor, ctx: Tensor | None = None) -> Tensor:
        """log p(x|z) in nats, (B,): x (B, C, H, W) integers, z (B, latent_dim).

        ``ctx``: the decoder's context features of x (:meth:`Decoder.context`), if already computed.
        """
        dec = self.decoder
        base, mix = dec.features(z)
        if mix is not None and ctx is None:
            ctx = dec.context(to_unit_range(x, self.levels))
        w, m, s = dec.params(base, mix, ctx)
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
        image, so each image's estimate depends on that image alone, not on its batch. Without
        gradients on the CPU, a batch of at least as many images as the caller has torch threads
        (two or more) is shared out by images over them, each share on one thread
        (:func:`models.threads.split_batch`, as :meth:`models.fast.FastPixelCNN.pixel_log_prob`):
        no thread waits at each operation's barrier for another (docs/serving.md).
        """
        self.check_input(x)
        gen = torch.Generator(device="cpu").manual_seed(self.config.iwae_seed)
        eps = torch.randn(k, self.config.latent_dim, generator=gen).to(x.device)
        threads = torch.get_num_threads()
        if x.device.type != "cpu" or torch.is_grad_enabled() or not 2 <= threads <= x.shape[0]:
            return self._log_weights(x, eps)
        shares: dict[int, Tensor] = {}  # first row -> that share's (rows, k) weights, as computed

        def share(rows: slice) -> None:
            shares[rows.start] = self._log_weights(x[rows], eps)

        with torch_threads(1):
            split_batch(share, x.shape[0], threads)
        return torch.cat([shares[start] for start in sorted(shares)])

    def _log_weights(self, x: Tensor, eps: Tensor) -> Tensor:
        """:meth:`log_weights` for images x (B, C, H, W) and the noise eps (k, latent_dim): (B, k) nats."""
        cfg = self.config
        k = eps.shape[0]
        x_unit = to_unit_range(x, cfg.levels)
        mean, logvar = self.encoder(x_unit)
        std = torch.exp(0.5 * logvar)
        ctx = self.decoder.context(x_unit) if cfg.decoder_context else None  # once per image, not per z
        b = x.shape[0]
        out = []
        for start in range(0, k, cfg.iwae_chunk):
            e = eps[start : start + cfg.iwae_chunk]  # (k', D)
            kc = e.shape[0]
            z = mean[:, None] + std[:, None] * e[None]  # (B, k', D)
            log_q = (-0.5 * e.pow(2) - 0.5 * math.log(2 * math.pi))[None].sum(-1) - logvar.sum(1, keepdim=True) / 2
            log_pz = (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).sum(-1)
            xr = x[:, None].expand(b, kc, *x.shape[1:]).reshape(b * kc, *x.shape[1:])
            cr = None if ctx is None else ctx[:, None].expand(b, kc, *ctx.shape[1:]).reshape(b * kc, *ctx.shape[1:])
            log_px = self.decoder_log_prob(xr, z.reshape(b * kc, -1), cr).view(b, kc)
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
        on_row: RowCallback | None = None,
    ) -> SampleOutput:
        """Decode prior draws z ~ N(0, temperature^2 I); the likelihood of a VAE sample is not exact."""
        check_temperature(temperature)
        self.check_labels(n, y)
        dev = self.device
        z = torch.randn(n, self.config.latent_dim, generator=generator, device=dev) * temperature
        if self.config.decoder_context:
            return SampleOutput(images=self._sample_context(z, generator, on_row), log_prob=None)
        w, m, s = self.decoder(z)
        x = sample_discretized_logistic_mixture(
            logit_weights=w, means=m, log_scales=s, levels=self.levels, generator=generator
        )
        if on_row is not None:
            on_row(self.config.height, x)  # all rows at once
        return SampleOutput(images=x, log_prob=None)

    def _sample_context(self, z: Tensor, generator: torch.Generator | None, on_row: RowCallback | None) -> Tensor:
        """Sub-pixel by sub-pixel for a local-context decoder; each step reads the window the
        context path sees (radius r = :attr:`Decoder.context_radius`), not the whole image."""
        cfg, dec = self.config, self.decoder
        n, r = z.shape[0], dec.context_radius
        size = 2 * r + 1
        base, mix = dec.features(z)
        assert mix is not None
        x = torch.zeros(n, cfg.in_channels, cfg.height, cfg.width, dtype=torch.uint8, device=z.device)
        xpad = torch.zeros(n, cfg.in_channels, cfg.height + 2 * r, cfg.width + 2 * r, device=z.device)
        for i in range(cfg.height):
            for j in range(cfg.width):
                inside = dec.window_inside(i, j, z.device)
                window = xpad[:, :, i : i + size, j : j + size]  # centred on (i, j)
                for c in range(cfg.in_channels):
                    ctx = dec.context_at(window, inside)  # (n, hidden, 1, 1)
                    w, m, s = dec.params(base[:, :, i : i + 1, j : j + 1], mix[:, :, i : i + 1, j : j + 1], ctx)
                    v = sample_discretized_logistic_mixture(
                        logit_weights=w[:, c : c + 1], means=m[:, c : c + 1], log_scales=s[:, c : c + 1],
                        levels=cfg.levels, generator=generator,
                    )  # (n, 1, 1, 1)  # fmt: skip
                    x[:, c, i, j] = v[:, 0, 0, 0]
                    xpad[:, c, i + r, j + r] = to_unit_range(v[:, 0, 0, 0], cfg.levels)
            if on_row is not None:
                on_row(i + 1, x)
        return x
