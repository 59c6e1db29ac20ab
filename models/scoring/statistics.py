"""Summary statistics of one model pass, for the combined outlier score (:mod:`models.scoring.dose`).

Every statistic comes from one forward pass of the main model over a batch of 2B images: the B
images and their vertical flips (``x.flip(2)``, upside down), and for unconditional autoregressive
models also their transposes where ``transpose`` is used (a batch of 3B); a calibration that leaves
``flip`` to its companion drops the flips from the pass (:func:`own_statistic_names`). The flip is
what lets a density model see orientation: an upright garment is more likely than the same garment upside down, so
``flip = NLL(x) - NLL(upside-down x)`` is negative for upright clothes and positive for clothes sent
upside down, whatever the garment's own complexity (which cancels in the difference).

Statistics (``tail``: which side of the in-distribution range is anomalous):

- ``nll`` (both): -log2 p(x) / D, bits/dim. Too high: unlike the training data; too low: simpler
  than any garment (digits, flat images; Nalisnick et al. 2019).
- ``complexity`` (upper): ``nll`` minus the lossless WebP code length per dim (Serrà et al. 2020);
  its lower tail is incompressible noise, which ``nll`` already refuses.
- ``flip`` (upper): ``nll(x) - nll(x upside down)``, bits/dim.
- ``border`` (both): mean intensity of the outer two-pixel ring, 0..1 (Fashion-MNIST garments sit
  on a dark background that is rarely exactly black; photos, documents and screenshots fill the
  frame, drawings on pure black leave it empty).
- ``background`` (both): fraction of pixels at most 2% of full scale (black); a garment image is
  half black, a photo almost never, a small mark on black almost entirely.
- ``pixel_top`` (both, autoregressive models): mean of the 5% largest per-pixel NLLs, nats.
- ``dark_nll`` (both, autoregressive models): mean per-pixel NLL of the dark pixels (those counted by
  ``background``), nats. A garment is one solid piece on black, so the model predicts black well
  wherever it puts black; a drawing has holes, gaps and separate parts (the inside of a ring, the
  dots of an arrow, the space between two triangles), black where the model expected the garment
  to go on. Low values (digits on exact black) are anomalous too.
- ``transpose`` (upper, unconditional autoregressive models on square images):
  ``nll(x) - nll(x transposed)``, bits/dim. Garments have an up and a down, so an upright garment
  turned on its side (its transpose) is far less likely (the statistic is clearly negative); a
  circle, an emoji, an arrow or a logo is about as likely either way (near 0 or positive). Like
  ``flip``, the image's own complexity cancels in the difference. Costs a third image per image
  in the one pass.
- ``kl`` (both, VAEs): KL(q(z|x) || N(0, I)) per dim, nats; ``latent`` (both, VAEs): ||E[z|x]||^2 /
  latent_dim, the typicality of the code under the prior.
- ``companion_*``: the statistics of a *companion* model's own pass over the same images (a VAE of
  the same data in the model folder's ``companion/``; models/scoring/scorer.py): ``companion_nll``,
  ``companion_complexity``, ``companion_flip``, ``companion_kl``, ``companion_latent``. An
  autoregressive model sees pixels given the pixels before them; a VAE sees the whole image through
  its code, and a small drawing on black (an icon, a logo, an emoji) that the autoregressive model
  finds plausible pixel by pixel has a code that no garment has. Combined only where a calibration
  chose them (``genserve calibrate --companion``).

:func:`model_statistics` computes them for a batch; they are pure functions of the model outputs
(:func:`raw_outputs`) and the image, so datasets can be scored once and cached
(models/tools/score_sets.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol, overload

import torch
from torch import Tensor

from models.base import AutoregressiveModel, DensityModel
from models.likelihood import to_unit_range
from models.scoring.classify import class_log_likelihood, posterior_from
from models.scoring.coders import code_length_bits
from models.vae import VAE


class Combination(Protocol):
    """What the statistics read of a fitted dose combination (:class:`models.scoring.dose.DoseFit`)."""

    statistics: list[str]


class Scorer(Protocol):
    """What the statistics read of a :class:`models.scoring.scorer.Scorer` (which imports this module)."""

    @property
    def dose(self) -> Combination | None: ...

    @property
    def model(self) -> DensityModel: ...

    @property
    def prior(self) -> Tensor | None: ...

    @property
    def vae_score_k(self) -> int: ...

    @property
    def companion(self) -> Scorer | None: ...

    @property
    def with_transpose(self) -> bool: ...


STATS_VERSION = "stats-v2"  # part of every cache key of statistics
UPPER, LOWER, BOTH = "upper", "lower", "both"
PIXEL_TOP_FRACTION = 0.05
DARK_FRACTION = 0.02  # "background": pixels at most this fraction of full scale


@dataclass(frozen=True)
class Statistic:
    name: str
    tail: str  # UPPER, LOWER or BOTH: where an outlier lies
    description: str


STATISTICS: dict[str, Statistic] = {
    s.name: s
    for s in (
        Statistic("nll", BOTH, "-log2 p(x) / D, bits/dim"),
        Statistic("complexity", UPPER, "nll minus the lossless WebP code length per dim, bits/dim"),
        Statistic("flip", UPPER, "nll(x) - nll(x upside down), bits/dim: positive when x looks upside down"),
        Statistic("border", BOTH, "mean intensity of the outer two-pixel ring, 0..1"),
        Statistic("background", BOTH, "fraction of pixels at most 2% of full scale (black)"),
        Statistic("pixel_top", BOTH, "mean of the 5% largest per-pixel NLLs, nats (autoregressive models)"),
        Statistic("dark_nll", BOTH, "mean per-pixel NLL of the dark pixels, nats: black where a garment would go on"),
        Statistic("transpose", UPPER, "nll(x) - nll(x transposed), bits/dim: near 0 or more when x has no up and down"),
        Statistic("kl", BOTH, "KL(q(z|x) || N(0, I)) per latent dimension, nats (VAEs)"),
        Statistic("latent", BOTH, "||E[z|x]||^2 / latent_dim: typicality of the code under the prior (VAEs)"),
    )
}
COMPANION_PREFIX = "companion_"
# what a companion adds: its own model's statistics (border and background are the image's, not a model's)
COMPANION_STATISTICS = ("nll", "complexity", "flip", "kl", "latent")
STATISTICS.update(
    {
        COMPANION_PREFIX + n: Statistic(COMPANION_PREFIX + n, s.tail, "the companion's " + s.description)
        for n, s in ((n, STATISTICS[n]) for n in COMPANION_STATISTICS)
    }
)


def statistic_names(scorer: Scorer) -> list[str]:
    """The statistics a scorer gives: its model's (:func:`own_statistic_names`), then its companion's,
    prefixed (:func:`companion_names`)."""
    return own_statistic_names(scorer) + [COMPANION_PREFIX + n for n in companion_names(scorer)]


def companion_names(scorer: Scorer) -> list[str]:
    """The statistics (unprefixed) the scorer takes from its companion's pass: none without a
    companion, or once the calibrated dose combination uses none of them (the pass is then skipped)."""
    comp = scorer.companion
    if comp is None:
        return []
    if scorer.dose is not None and not any(n.startswith(COMPANION_PREFIX) for n in scorer.dose.statistics):
        return []
    return [n for n in own_statistic_names(comp) if n in COMPANION_STATISTICS]


def own_statistic_names(scorer: Scorer) -> list[str]:
    """The statistics a scorer's own model gives. ``flip`` and ``transpose`` each cost one more image
    per image in the pass, so each is computed only where it is used: ``flip`` before a calibration
    and wherever the calibrated dose combination uses it (a calibration may leave it to the
    companion's ``companion_flip``); ``transpose`` where the combination uses it or, before a
    calibration, where the scorer asks for it (``with_transpose``: a calibration that combines it)."""
    used = None if scorer.dose is None else scorer.dose.statistics
    names = ["nll", "complexity"] + (["flip"] if used is None or "flip" in used else []) + ["border", "background"]
    model = scorer.model
    if isinstance(model, AutoregressiveModel) and model.n_classes is None:
        names += ["pixel_top", "dark_nll"]
        wanted = scorer.with_transpose if used is None else "transpose" in used
        if transposes(model) and wanted:
            names.append("transpose")
    if isinstance(model, VAE):
        names += ["kl", "latent"]
    return names


def transposes(model: DensityModel) -> bool:
    """Whether the statistics pass scores the images' transposes too (unconditional autoregressive
    models of square images: the ``transpose`` statistic)."""
    _, h, w = model.shape
    return isinstance(model, AutoregressiveModel) and model.n_classes is None and h == w


def dark_mask(x: Tensor, levels: int) -> Tensor:
    """The dark pixels of images x (B, C, H, W) integer levels: at most DARK_FRACTION of full scale."""
    return x.double() / (levels - 1) <= DARK_FRACTION


def dark_nll(nll_pix: Tensor, x: Tensor, levels: int) -> Tensor:
    """Mean per-pixel NLL (nats) of the dark pixels (:func:`dark_mask`) of images x (B, C, H, W),
    given their per-pixel NLLs nll_pix (B, C, H, W); 0 for an image without dark pixels. (B,)"""
    dark = dark_mask(x, levels).flatten(1)  # (B, C*H*W)
    total = (nll_pix.flatten(1).double() * dark).sum(1)
    return total / dark.sum(1).clamp(min=1)


def vae_terms(model: VAE, x: Tensor, k: int) -> dict[str, Tensor]:
    """log w (IWAE estimate with k samples, equal to ``model.iwae(x, k)``), KL(q || p) and ||mu||^2,
    each (B,), from one encoder pass (and for k=1 one decoder pass)."""
    cfg = model.config
    x_unit = to_unit_range(x, cfg.levels)
    mean, logvar = model.encoder(x_unit)  # (B, D) each
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)
    if k == 1:  # the first of log_weights' fixed noise draws, without a second encoder pass
        gen = torch.Generator(device="cpu").manual_seed(cfg.iwae_seed)
        eps = torch.randn(1, cfg.latent_dim, generator=gen).to(x.device)
        z = mean + torch.exp(0.5 * logvar) * eps
        log_q = (-0.5 * eps.pow(2) - 0.5 * math.log(2 * math.pi)).sum(-1) - logvar.sum(1) / 2
        log_pz = (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).sum(-1)
        ctx = model.decoder.context(x_unit) if cfg.decoder_context else None
        lw = model.decoder_log_prob(x, z, ctx) + log_pz - log_q
    else:
        lw = model.iwae(x, k)
    return {"log_prob": lw, "kl": kl, "latent": mean.pow(2).sum(1)}


@torch.inference_mode()
def raw_outputs(scorer: Scorer, x: Tensor) -> dict[str, Tensor]:
    """One pass of the main model over x (B, C, H, W), with its vertical flip and its transpose where
    their statistics are used (:func:`own_statistic_names`; a batch of B to 3B): float32 tensors
    ``log_prob`` and, where used, ``flip_log_prob`` (B,) nats (a VAE's: IWAE with the scorer's k; a
    class-conditional model's: p(x) = sum_y p(x|y) p(y)),
    ``pixel_top``, ``dark_nll`` and ``transpose_log_prob`` (B,) nats for unconditional autoregressive
    models, ``kl`` and ``latent`` (B,) for VAEs."""
    b = x.shape[0]
    model = scorer.model
    names = own_statistic_names(scorer)
    parts = [x]  # the images, then upside down and turned on their side where those are used
    others = [k for k, used in (("flip", "flip" in names), ("transpose", "transpose" in names)) if used]
    parts += [x.flip(2) if k == "flip" else x.transpose(2, 3) for k in others]
    xx = torch.cat(parts)  # (B, 2B or 3B, C, H, W)
    out: dict[str, Tensor] = {}
    if model.n_classes is not None:
        assert scorer.prior is not None
        cll = class_log_likelihood(model, xx)  # (len(parts) * B, K) nats
        lp = posterior_from(cll, scorer.prior).log_marginal
        out["class_log_likelihood"] = cll[:b]
    elif isinstance(model, VAE):
        terms = vae_terms(model, xx, scorer.vae_score_k)
        lp = terms["log_prob"]
        d = model.config.latent_dim
        out["kl"] = terms["kl"][:b] / d
        out["latent"] = terms["latent"][:b] / d
    else:
        assert isinstance(model, AutoregressiveModel)
        pixel_nll = -model.pixel_log_prob(xx[:b])  # (B, C, H, W) nats
        nll_pix = pixel_nll.sum(1).flatten(1)  # (B, H*W)
        lp = -nll_pix.sum(1)
        if others:
            lp = torch.cat([lp, model.log_prob(xx[b:])])
        top = max(1, round(PIXEL_TOP_FRACTION * nll_pix.shape[1]))
        out["pixel_top"] = nll_pix.topk(top, dim=1).values.mean(1)
        out["dark_nll"] = dark_nll(pixel_nll, x, model.levels)
    out["log_prob"] = lp[:b]
    for i, other in enumerate(others, start=1):
        out[f"{other}_log_prob"] = lp[i * b : (i + 1) * b]
    return {k: v.float() for k, v in out.items()}


def image_statistics(x: Tensor, *, levels: int) -> dict[str, Tensor]:
    """``border`` and ``background`` of images x (B, C, H, W) integer levels, (B,) float64 each."""
    v = x.double() / (levels - 1)
    ring = torch.ones(x.shape[2:], dtype=torch.bool, device=x.device)
    ring[2:-2, 2:-2] = False  # the outer two-pixel ring
    border = v[:, :, ring].flatten(1).mean(1)
    background = dark_mask(x, levels).flatten(1).double().mean(1)
    return {"border": border, "background": background}


def statistics_from(
    raw: dict[str, Tensor], *, code_bits: Tensor, image_stats: dict[str, Tensor], dims: int
) -> dict[str, Tensor]:
    """Every statistic (B,) float64 from :func:`raw_outputs`, the code lengths (B,) bits and
    :func:`image_statistics`."""
    ln2 = math.log(2.0)
    nll = -raw["log_prob"].double().cpu() / (dims * ln2)
    out = {
        "nll": nll,
        "complexity": nll - code_bits.double().cpu() / dims,
        **{k: v.cpu() for k, v in image_stats.items()},
    }
    if "flip_log_prob" in raw:
        out["flip"] = nll + raw["flip_log_prob"].double().cpu() / (dims * ln2)
    if "transpose_log_prob" in raw:
        out["transpose"] = nll + raw["transpose_log_prob"].double().cpu() / (dims * ln2)
    for k in ("pixel_top", "dark_nll", "kl", "latent"):
        if k in raw:
            out[k] = raw[k].double().cpu()
    return out


@overload
def own_statistics(scorer: Scorer, x: Tensor, *, code_bits: Tensor | None = None) -> dict[str, Tensor]: ...
@overload
def own_statistics(
    scorer: Scorer, x: Tensor, *, with_raw: Literal[True], code_bits: Tensor | None = None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]: ...
def own_statistics(
    scorer: Scorer, x: Tensor, *, with_raw: bool = False, code_bits: Tensor | None = None
) -> dict[str, Tensor] | tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The statistics of the scorer's own model (:func:`own_statistic_names`) for images x (B, C, H,
    W): (B,) float64 each, on CPU; with ``with_raw`` also :func:`raw_outputs`. ``code_bits``: the
    images' lossless code lengths (B,) bits where already computed (else computed here)."""
    raw = raw_outputs(scorer, x)
    if code_bits is None:
        code_bits = code_length_bits(x, levels=scorer.model.levels)
    stats = statistics_from(
        raw, code_bits=code_bits, image_stats=image_statistics(x, levels=scorer.model.levels), dims=scorer.model.dims
    )
    stats = {n: stats[n] for n in own_statistic_names(scorer)}
    return (stats, raw) if with_raw else stats


@overload
def model_statistics(scorer: Scorer, x: Tensor, *, code_bits: Tensor | None = None) -> dict[str, Tensor]: ...
@overload
def model_statistics(
    scorer: Scorer, x: Tensor, *, with_raw: Literal[True], code_bits: Tensor | None = None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]: ...
def model_statistics(
    scorer: Scorer, x: Tensor, *, with_raw: bool = False, code_bits: Tensor | None = None
) -> dict[str, Tensor] | tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Every statistic the scorer gives (:func:`statistic_names`), for images x (B, C, H, W): (B,)
    float64 each, on CPU; with ``with_raw`` also its own model's :func:`raw_outputs` (its
    ``log_prob`` is what /score reports). The companion's statistics come from its own pass."""
    if code_bits is None:  # once for both models: the same images, the same coder
        code_bits = code_length_bits(x, levels=scorer.model.levels)
    stats, raw = own_statistics(scorer, x, with_raw=True, code_bits=code_bits)
    wanted = companion_names(scorer)
    if wanted:
        assert scorer.companion is not None
        theirs = model_statistics(scorer.companion, x.to(scorer.companion.model.device), code_bits=code_bits)
        stats.update({COMPANION_PREFIX + n: theirs[n] for n in wanted})
    return (stats, raw) if with_raw else stats
