"""Outlier scores for density models, and their calibration.

Raw likelihood is a poor outlier score: a PixelCNN trained on Fashion-MNIST gives MNIST digits a
*higher* likelihood than its own test images (Nalisnick et al. 2019, "Do Deep Generative Models
Know What They Don't Know?"), because simple images are cheap to code under any image model.
Two corrections remove that shared "simplicity" term:

- ``likelihood_ratio`` (Ren et al. 2019, "Likelihood Ratios for Out-of-Distribution Detection"):
  log p_bg(x) - log p(x), with p_bg a smaller model of the same family trained on inputs whose
  sub-pixels were replaced by uniform noise at rate ~0.2 (``genserve train --perturb 0.2``). The
  background model learns the population statistics and not the semantics; the ratio keeps the
  semantics. The background is shipped beside its model in ``<folder>/background/``.
- ``complexity`` (Serrà et al. 2020, "Input Complexity and Out-of-Distribution Detection with
  Likelihood-based Generative Models"): -log2 p(x) - L(x), with L(x) the code length of a generic
  lossless compressor (lossless WebP, falling back to the raw pixels where it expands the image),
  which measures the same simplicity without having been trained on anything.
- ``complexity_guarded``: the complexity score plus a likelihood floor, ``complexity + 10 *
  max(0, nll - nll_cap)`` with ``nll_cap`` the largest NLL among the calibration images. Complexity
  alone subtracts a large L(x) from incompressible images such as uniform noise, whose likelihood is
  far below anything in distribution; the floor gives back raw likelihood's verdict there and changes
  nothing at or below the calibration range (docs/ood.md measures both).

Every score is in bits per dimension and higher means more anomalous. The score functions below are
pure functions of model outputs; :class:`Scorer` runs one loaded model (and its background) on a
batch and applies them, and it is the only path the service, ``genserve calibrate`` and
``genserve eval-ood`` use, so a calibrated threshold always judges the function it was computed from.

Calibration (:func:`calibrate_scores`): the empirical quantiles of a score on held-out in-
distribution data and the threshold whose false-positive rate is the target (conformal order
statistic: the k-th smallest of n scores with k = ceil((n + 1)(1 - fpr)); a new in-distribution
image then lies above it with probability at most fpr, and about fpr for large n).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from models.base import AutoregressiveModel, DensityModel
from models.checkpoint import META, load_checkpoint
from models.classify import check_prior, class_log_likelihood, posterior_from, training_prior, uniform_prior
from models.dose import DoseFit, fit_dose
from models.likelihood import bits_per_dim
from models.ood_stats import dataset_statistics, model_statistics, statistic_names
from models.vae import VAE

logger = logging.getLogger(__name__)

BACKGROUND = "background"  # a model folder's companion background model (Ren et al.)
NLL, COMPLEXITY, RATIO, GUARDED = "nll", "complexity", "likelihood_ratio", "complexity_guarded"
DOSE = "dose"  # the combined score of models/dose.py; offered once a calibration has fitted it
# complexity_guarded adds this many bits/dim per bit/dim of NLL above the calibration images' largest
GUARD_WEIGHT = 10.0
DEFAULT_FPR = 0.01
N_QUANTILES = 100  # calibration stores q_0 .. q_100 (percentiles)
# IWAE samples behind a VAE's outlier scores (the served ones and their calibration). log_prob's 128
# cost 148 times one pass; k=1 and k=8 detect equally well (docs/ood.md).
DEFAULT_VAE_SCORE_K = 1


# ---- scores: pure functions of model outputs ------------------------------------------------------


def nll_score(log_prob: Tensor, *, dims: int) -> Tensor:
    """Raw negative log-likelihood in bits/dim: log_prob (B,) nats -> (B,) float64."""
    return torch.as_tensor(bits_per_dim(log_prob.double(), dims))


def complexity_score(log_prob: Tensor, *, code_bits: Tensor, dims: int) -> Tensor:
    """Serrà et al.'s S(x) = -log2 p(x) - L(x), per dimension: (B,) float64 bits/dim.

    log_prob: (B,) nats; code_bits: (B,) lossless code length L(x) of each image in bits.
    """
    assert log_prob.shape == code_bits.shape, (log_prob.shape, code_bits.shape)
    return nll_score(log_prob, dims=dims) - code_bits.double().to(log_prob.device) / dims


def guarded_score(complexity: Tensor, nll: Tensor, *, nll_cap: float | None) -> Tensor:
    """The complexity score (B,) plus ``GUARD_WEIGHT`` times the NLL (B,) in bits/dim above ``nll_cap``
    (the calibration images' largest); without a cap (an uncalibrated model) the complexity score."""
    if nll_cap is None:
        return complexity
    return complexity + GUARD_WEIGHT * (nll - nll_cap).clamp_min(0.0)


def likelihood_ratio_score(log_prob: Tensor, *, background_log_prob: Tensor, dims: int) -> Tensor:
    """Ren et al.'s -LLR(x) = log p_bg(x) - log p(x), per dimension: (B,) float64 bits/dim.

    log_prob, background_log_prob: (B,) nats under the model and its background model.
    """
    assert log_prob.shape == background_log_prob.shape, (log_prob.shape, background_log_prob.shape)
    return nll_score(log_prob, dims=dims) - nll_score(background_log_prob, dims=dims)


def png_code_bits(x: Tensor) -> Tensor:
    """Bits of each image's PNG stream at maximum compression (zlib level 9, Pillow's filter choice):
    the IDAT payload, without the file's constant signature and chunk framing, which a decoder that
    knows the image shape does not need. x (B, C, H, W) integers, C in {1, 3}, values < 256 ->
    (B,) float64."""
    assert x.dim() == 4 and x.shape[1] in (1, 3), x.shape
    arr = x.detach().to("cpu", torch.uint8).numpy()
    bits = []
    for im in arr:
        buf = io.BytesIO()
        pil = Image.fromarray(im[0] if im.shape[0] == 1 else np.ascontiguousarray(im.transpose(1, 2, 0)))
        pil.save(buf, format="PNG", optimize=True, compress_level=9)
        bits.append(8.0 * _idat_bytes(buf.getvalue()))
    return torch.tensor(bits, dtype=torch.float64)


def _idat_bytes(png: bytes) -> int:
    """Total length of a PNG file's IDAT chunks (its compressed image data)."""
    pos, total = 8, 0  # after the 8-byte signature: chunks of length (4), type (4), data, crc (4)
    while pos + 8 <= len(png):
        length = struct.unpack(">I", png[pos : pos + 4])[0]
        if png[pos + 4 : pos + 8] == b"IDAT":
            total += length
        pos += 12 + length
    return total


def webp_code_bits(x: Tensor) -> Tensor:
    """Bits of each image as lossless WebP (quality 100, method 4: libwebp's default effort): the VP8L
    bitstream, without the file's constant RIFF framing. x (B, C, H, W) integers, C in {1, 3},
    values < 256 -> (B,) float64."""
    assert x.dim() == 4 and x.shape[1] in (1, 3), x.shape
    arr = x.detach().to("cpu", torch.uint8).numpy()
    bits = []
    for im in arr:
        buf = io.BytesIO()
        pil = Image.fromarray(im[0] if im.shape[0] == 1 else np.ascontiguousarray(im.transpose(1, 2, 0)))
        pil.save(buf, format="WEBP", lossless=True, quality=100, method=4)
        data = buf.getvalue()
        # RIFF header (12 bytes), then one chunk: "VP8L", its length (4 bytes, little-endian), the bitstream.
        vp8l = struct.unpack("<I", data[16:20])[0] if data[12:16] == b"VP8L" else len(data)
        bits.append(8.0 * vp8l)
    return torch.tensor(bits, dtype=torch.float64)


CODER = "webp-lossless-q100-m4|raw"  # what code_length_bits is; calibrations record it


def code_length_bits(x: Tensor, *, levels: int) -> Tensor:
    """L(x) of the complexity score: the shorter of the lossless WebP bitstream and the raw image
    (D log2(levels) bits, what incompressible noise costs), plus one bit saying which: a lossless code
    length in bits, (B,) float64, for x (B, C, H, W) integers in [0, levels-1].

    WebP's lossless coder (spatial prediction, colour cache, entropy-coded residuals) codes these
    images ~0.06 bits/dim shorter than PNG and separates better (bench/complexity_coders.py); the raw
    fallback keeps noise, which every coder expands, from looking less surprising than it is."""
    raw = x[0].numel() * math.log2(levels)
    return 1.0 + torch.clamp(webp_code_bits(x), max=raw)


def coder_version() -> str:
    """The libwebp that :func:`webp_code_bits` ran (recorded with a calibration)."""
    from PIL import features

    return f"libwebp {features.version('webp')}, Pillow {Image.__version__}"


@dataclass(frozen=True)
class ScoreType:
    name: str
    description: str
    needs_background: bool = False


SCORE_TYPES: dict[str, ScoreType] = {
    NLL: ScoreType(NLL, "raw negative log-likelihood, bits/dim (fails on simple out-of-distribution images)"),
    COMPLEXITY: ScoreType(COMPLEXITY, "NLL minus lossless WebP code length, bits/dim (Serrà et al. 2020)"),
    GUARDED: ScoreType(
        GUARDED,
        "complexity + 10 * max(0, NLL - the largest calibration NLL), bits/dim: complexity with a likelihood "
        "floor for images less likely than any calibration image (before calibration: complexity)",
    ),
    RATIO: ScoreType(RATIO, "NLL minus the background model's NLL, bits/dim (Ren et al. 2019)", needs_background=True),
    DOSE: ScoreType(
        DOSE,
        "max over the model's summary statistics (NLL, complexity, NLL of the image against its upside-down "
        "copy, border, background, ...) of -log10 of its in-distribution tail probability (DoSE-style; "
        "Morningstar et al. 2021); offered once calibrated",
    ),
}


def needs_code(names: Sequence[str]) -> bool:
    """True if any of the score types subtracts a lossless code length."""
    return COMPLEXITY in names or GUARDED in names


def available_score_types(*, has_background: bool, has_dose: bool = False) -> list[str]:
    """Score types a model offers: likelihood_ratio needs a background model, dose a calibration that
    fitted its densities."""
    return sorted(
        n for n, t in SCORE_TYPES.items() if (has_background or not t.needs_background) and (has_dose or n != DOSE)
    )


def calibrated_dose(meta: dict[str, Any]) -> DoseFit | None:
    """The dose densities a checkpoint's calibration fitted, if any."""
    d = (meta.get("calibration") or {}).get("dose")
    return DoseFit.from_json(d) if d else None


def recommended_score(*, has_background: bool) -> str:
    """The default chosen by the evaluation in docs/ood.md: the complexity-corrected likelihood with a
    likelihood floor, for every model. (The shipped background model's likelihood ratio reached MNIST
    AUROC 0.81 against complexity's 0.997, and 0.03 on constant images, which the background finds
    harder than the main model does; complexity alone lost to raw likelihood on uniform noise.)"""
    del has_background  # a stronger background model may earn the ratio the default: measure first
    return GUARDED


# ---- the scorer: one loaded model (and its background) -------------------------------------------


@dataclass
class ModelOutputs:
    """What the models say about a batch: log p(x) and log p_bg(x) in nats (B,), float32, and where
    asked the per-pixel log-probabilities (B, C, H, W)."""

    log_prob: Tensor
    background_log_prob: Tensor | None = None
    pixel_log_prob: Tensor | None = None
    background_pixel_log_prob: Tensor | None = None
    class_log_likelihood: Tensor | None = None  # (B, K) log p(x|y) per class, when log_prob is p(x)'s


@dataclass
class ScoreBatch:
    """Per-image outputs for one batch, each keyed by score type.

    log_prob: the log p(x) estimate (nats, (B,)) the score used (a VAE's: IWAE with ``vae_score_k``);
    scores: (B,) bits/dim; heatmaps: (B, H, W) per-pixel anomaly in nats (autoregressive models);
    class_log_likelihood: (B, K) log p(x|y) in nats for every class, where a class-conditional model
    scored unlabelled images (then log_prob is log p(x) = log sum_y p(x|y) p(y)).
    """

    log_prob: dict[str, Tensor]
    scores: dict[str, Tensor]
    heatmaps: dict[str, Tensor]
    class_log_likelihood: Tensor | None = None
    dose_values: Tensor | None = None  # (B, S) the dose statistics, in DoseFit.statistics' order
    dose_log10_p: Tensor | None = None  # (B, S) their log10 tail probabilities
    dose_contributions: Tensor | None = None  # (B, S) each statistic's share of the dose score


class Scorer:
    """Outlier scores of one model, with its background companion where it has one.

    ``vae_score_k``: importance samples of the IWAE estimate of log p(x) behind every score of a VAE
    (its ``log_prob`` uses ``iwae_samples``, 128 for the shipped model, a hundred decoder passes).

    A class-conditional model given no labels scores its marginal p(x) = sum_y p(x|y) p(y) (``prior``
    p(y), shape (K,), default uniform; one pass per class): the density the outlier test and
    classification with rejection need. Given labels it scores p(x|y).
    """

    def __init__(
        self,
        model: DensityModel,
        background: DensityModel | None = None,
        *,
        vae_score_k: int = DEFAULT_VAE_SCORE_K,
        weights_sha256: str = "",
        background_sha256: str | None = None,
        prior: Tensor | None = None,
        nll_cap: float | None = None,
        dose: DoseFit | None = None,
    ) -> None:
        if model.n_classes is not None:
            prior = uniform_prior(model.n_classes) if prior is None else prior.float()
            check_prior(prior, model.n_classes)
        elif prior is not None:
            raise ValueError("a class prior needs a class-conditional model")
        if background is not None:
            if background.shape != model.shape or background.levels != model.levels:
                raise ValueError(
                    f"background model takes {background.shape} images with {background.levels} levels; "
                    f"its model takes {model.shape} with {model.levels}"
                )
            if background.n_classes is not None:
                raise ValueError("a background model must be unconditional")
        if vae_score_k < 1:
            raise ValueError(f"vae_score_k must be at least 1, got {vae_score_k}")
        self.model = model
        self.background = background
        self.vae_score_k = vae_score_k
        self.weights_sha256 = weights_sha256
        self.background_sha256 = background_sha256
        self.prior = prior
        self.nll_cap = nll_cap  # bits/dim: the calibration images' largest NLL (complexity_guarded's floor)
        self.dose = dose  # the fitted densities of the dose score (from the calibration)

    @property
    def fingerprint(self) -> str:
        """What fixes this scorer's outputs (for caches): both models' weights and the VAE's k."""
        parts = [self.weights_sha256, self.background_sha256 or "-", str(self.vae_score_k), "outputs-v2"]
        if self.prior is not None:
            parts.append(",".join(f"{p:.8g}" for p in self.prior.tolist()))
        if not self.weights_sha256:
            raise ValueError("a scorer built without weights_sha256 cannot be cached; use load_scorer")
        return hashlib.sha256("/".join(parts).encode()).hexdigest()[:16]

    @property
    def score_types(self) -> list[str]:
        return available_score_types(has_background=self.background is not None, has_dose=self.dose is not None)

    @property
    def recommended(self) -> str:
        return recommended_score(has_background=self.background is not None)

    @property
    def per_pixel(self) -> bool:
        return isinstance(self.model, AutoregressiveModel)

    def check(self, names: Sequence[str], *, heatmap: bool = False, labelled: bool = False) -> None:
        unknown = [n for n in names if n not in self.score_types]
        if unknown:
            raise ValueError(f"unknown score type(s) {unknown}; this model offers {self.score_types}")
        if heatmap and not self.per_pixel:
            raise ValueError("heatmaps need per-pixel likelihoods, which only autoregressive models give")
        if heatmap and self.model.n_classes is not None and not labelled:
            raise ValueError(
                "a class-conditional model's p(x) is a mixture over classes with no per-pixel factorisation; "
                "a heatmap needs a label (per-pixel log p(x_i | x_<i, y))"
            )

    @torch.inference_mode()
    def outputs(self, x: Tensor, y: Tensor | None = None, *, background: bool, pixels: bool = False) -> ModelOutputs:
        """The model passes behind every score, for images x (B, C, H, W) integer levels on the model's
        device: log p(x) (a VAE's IWAE with ``vae_score_k``), with ``background`` the background
        model's log p_bg(x), with ``pixels`` the per-pixel log-probabilities of both."""
        pixel: Tensor | None = None
        bg_pixel: Tensor | None = None
        bg_lp: Tensor | None = None
        class_ll: Tensor | None = None
        if self.model.n_classes is not None and y is None:
            assert not pixels and self.prior is not None, "p(x) of a conditional model has no per-pixel terms"
            class_ll = class_log_likelihood(self.model, x)  # (B, K) nats, K passes
            lp = posterior_from(class_ll, self.prior).log_marginal
        elif isinstance(self.model, VAE):
            assert not pixels, "a VAE has no per-pixel likelihoods"
            lp = self.model.iwae(x, self.vae_score_k)  # (B,) nats
        elif pixels:
            assert isinstance(self.model, AutoregressiveModel)
            pixel = self.model.pixel_log_prob(x, y)  # (B, C, H, W) nats
            lp = pixel.flatten(1).sum(1)  # the same sum log_prob takes
        else:
            lp = self.model.log_prob(x, y)
        if background:
            assert self.background is not None, "this model has no background model"
            if pixels:
                assert isinstance(self.background, AutoregressiveModel), "per-pixel maps need an AR background"
                bg_pixel = self.background.pixel_log_prob(x)
                bg_lp = bg_pixel.flatten(1).sum(1)
            else:
                bg_lp = self.background.log_prob(x)
        return ModelOutputs(
            log_prob=lp.float(),
            background_log_prob=None if bg_lp is None else bg_lp.float(),
            pixel_log_prob=pixel,
            background_pixel_log_prob=bg_pixel,
            class_log_likelihood=None if class_ll is None else class_ll.float(),
        )

    def scores_from(
        self, names: Sequence[str], outputs: ModelOutputs, *, code_bits: Tensor | None
    ) -> dict[str, Tensor]:
        """Scores (B,) bits/dim from model outputs and, for the complexity scores, the code lengths
        (B,): the one function behind /score, ``genserve calibrate`` and ``genserve eval-ood``."""
        dims = self.model.dims
        out = {}
        for n in names:
            if n == NLL:
                out[n] = nll_score(outputs.log_prob, dims=dims)
            elif n == COMPLEXITY:
                assert code_bits is not None
                out[n] = complexity_score(outputs.log_prob, code_bits=code_bits, dims=dims)
            elif n == GUARDED:
                assert code_bits is not None
                out[n] = guarded_score(
                    complexity_score(outputs.log_prob, code_bits=code_bits, dims=dims),
                    nll_score(outputs.log_prob, dims=dims),
                    nll_cap=self.nll_cap,
                )
            elif n == RATIO:
                assert outputs.background_log_prob is not None
                out[n] = likelihood_ratio_score(
                    outputs.log_prob, background_log_prob=outputs.background_log_prob, dims=dims
                )
            else:
                raise ValueError(f"unknown score type '{n}'")
        return out

    def compute(
        self, x: Tensor, y: Tensor | None = None, names: Sequence[str] = (), *, heatmap: bool = False
    ) -> ScoreBatch:
        """Scores ``names`` of images x (B, C, H, W) integer levels on the model's device (y: labels
        of a class-conditional model), sharing the passes the scores have in common; with ``heatmap``
        each score's per-pixel map (autoregressive models)."""
        names = list(dict.fromkeys(names)) or [self.recommended]
        self.check(names, heatmap=heatmap, labelled=y is not None)
        others = [n for n in names if n != DOSE]
        log_prob: dict[str, Tensor] = {}
        scores: dict[str, Tensor] = {}
        heatmaps: dict[str, Tensor] = {}
        class_ll = None
        values = log10_p = contrib = None
        if DOSE in names:
            assert self.dose is not None
            if y is not None:
                raise ValueError("the dose score judges p(x); a class-conditional model's p(x|y) has no calibration")
            stats, raw = model_statistics(self, x, with_raw=True)
            arrays = {k: v.numpy() for k, v in stats.items()}
            lp10 = self.dose.log10_p(arrays)  # (B, S)
            log10_p = torch.from_numpy(lp10)
            values = torch.stack([stats[n] for n in self.dose.statistics], dim=1)
            parts = self.dose.contributions(arrays)  # (B, S), rows sum to the score
            contrib = torch.from_numpy(parts)
            scores[DOSE] = torch.from_numpy(parts.sum(axis=1))
            log_prob[DOSE] = raw["log_prob"].cpu()
            class_ll = raw.get("class_log_likelihood")
        if others or heatmap:
            o = self.outputs(x, y, background=RATIO in others, pixels=heatmap)
            code_bits = code_length_bits(x, levels=self.model.levels) if needs_code(others) else None
            scores.update(self.scores_from(others, o, code_bits=code_bits))
            log_prob.update(dict.fromkeys(others, o.log_prob))
            class_ll = o.class_log_likelihood if class_ll is None else class_ll
            if o.pixel_log_prob is not None:
                for n in names:
                    bg = o.background_pixel_log_prob if n == RATIO else None
                    heatmaps[n] = pixel_anomaly(o.pixel_log_prob, background_pixel_log_prob=bg)
        return ScoreBatch(
            log_prob=log_prob,
            scores=scores,
            heatmaps=heatmaps,
            class_log_likelihood=class_ll,
            dose_values=values,
            dose_log10_p=log10_p,
            dose_contributions=contrib,
        )


def pixel_anomaly(pixel_log_prob: Tensor, *, background_pixel_log_prob: Tensor | None = None) -> Tensor:
    """Per-pixel anomaly map (B, H, W) in nats, summed over channels: -log p(x_i | x_<i), minus the
    background model's -log p_bg(x_i | x_<i) where given (then negative where the background finds
    the pixel harder than the model does). Inputs: (B, C, H, W) log-probabilities in nats."""
    nll = -pixel_log_prob.float().sum(1)
    if background_pixel_log_prob is None:
        return nll
    assert background_pixel_log_prob.shape == pixel_log_prob.shape
    return nll + background_pixel_log_prob.float().sum(1)


def load_scorer(
    folder: str | Path, device: str | torch.device = "cpu", *, vae_score_k: int | None = None
) -> tuple[Scorer, dict[str, Any]]:
    """A model folder's scorer: the model, its ``background/`` companion if present (same device), and
    the VAE score k recorded by its calibration (``vae_score_k`` overrides it). Returns (scorer, the
    model's metadata)."""
    folder = Path(folder)
    model, meta = load_checkpoint(folder, device)
    background, bg_meta = None, None
    if (folder / BACKGROUND / META).is_file():
        background, bg_meta = load_checkpoint(folder / BACKGROUND, device)
    k = vae_score_k or int((meta.get("calibration") or {}).get("vae_score_k") or DEFAULT_VAE_SCORE_K)
    prior = None if model.n_classes is None else training_prior(meta, model.n_classes)
    cap = (meta.get("calibration") or {}).get("nll_cap")
    scorer = Scorer(
        model,
        background,
        dose=calibrated_dose(meta),
        vae_score_k=k,
        weights_sha256=meta["weights"]["sha256"],
        background_sha256=bg_meta["weights"]["sha256"] if bg_meta else None,
        prior=prior,
        nll_cap=None if cap is None else float(cap),
    )
    return scorer, meta


def stale_calibration(meta: dict[str, Any], background_meta: dict[str, Any] | None) -> str | None:
    """Why a checkpoint's calibration does not fit its weights (or its background's), else None."""
    cal = meta.get("calibration") or {}
    if not cal:
        return None
    if cal.get("weights_sha256") and cal["weights_sha256"] != meta["weights"].get("sha256"):
        return "it was computed for other weights"
    bg_sha = background_meta["weights"].get("sha256") if background_meta else None
    if "background_sha256" in cal and cal["background_sha256"] != bg_sha:
        return "it was computed with another background model"
    if cal.get("prior") is not None:
        now = training_prior(meta, len(cal["prior"])).tolist()
        if any(abs(a - b) > 1e-6 for a, b in zip(now, cal["prior"], strict=True)):
            return "it used another class prior p(y) than dataset.class_counts gives"
    coder = (cal.get("coder") or {}).get("name")
    if coder and coder != CODER:
        return f"its complexity score used the coder '{coder}', this genserve uses '{CODER}'"
    return None


# ---- scoring whole data sets -----------------------------------------------------------------------


def model_outputs(
    scorer: Scorer,
    images: Tensor,
    labels: Tensor | None = None,
    *,
    background: bool = False,
    batch_size: int = 128,
    cache_dir: str | Path | None = None,
    show_progress: bool = True,
) -> dict[str, np.ndarray]:
    """The model passes (:meth:`Scorer.outputs`) over images (N, C, H, W), batch by batch: arrays
    ``log_prob`` (N,) nats, with ``background`` ``background_log_prob`` (N,), and for a
    class-conditional model without labels ``class_log_likelihood`` (N, K). With ``cache_dir`` they
    are kept in ``cache_dir/<key>.npz``, keyed by the scorer's fingerprint and the images' (and
    labels') bytes, so a rerun, or calibrate after eval-ood, costs no model pass."""
    from models.evaluate import progress

    need = ["log_prob"] + (["background_log_prob"] if background else [])
    if scorer.model.n_classes is not None and labels is None:
        need.append("class_log_likelihood")
    path = None
    cached: dict[str, np.ndarray] = {}
    if cache_dir is not None:
        h = hashlib.sha256(scorer.fingerprint.encode())
        h.update(images.numpy().tobytes())
        if labels is not None:
            h.update(labels.numpy().tobytes())
        path = Path(cache_dir) / f"{h.hexdigest()[:24]}.npz"
        if path.is_file():
            with np.load(path) as f:
                cached = {k: f[k] for k in f.files}
    if not all(k in cached for k in need):
        dev = scorer.model.device
        parts: dict[str, list[Tensor]] = {k: [] for k in need}
        starts = range(0, len(images), batch_size)
        for s in progress(starts, total=len(starts), desc="model passes", enabled=show_progress):
            x = images[s : s + batch_size].to(dev)
            y = None if labels is None else labels[s : s + batch_size].to(dev)
            o = scorer.outputs(x, y, background=background)
            got = {
                "log_prob": o.log_prob,
                "background_log_prob": o.background_log_prob,
                "class_log_likelihood": o.class_log_likelihood,
            }
            for k in need:
                value = got[k]
                assert value is not None, k
                parts[k].append(value.cpu())
        cached.update({k: torch.cat(v).numpy() for k, v in parts.items()})
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, **cached)  # type: ignore[arg-type]  # numpy's stub types the kwargs as its bool flag
            tmp.replace(path)
    return {k: cached[k] for k in need}


def score_images(
    scorer: Scorer,
    images: Tensor,
    labels: Tensor | None = None,
    names: Sequence[str] = (),
    *,
    batch_size: int = 128,
    cache_dir: str | Path | None = None,
    show_progress: bool = True,
) -> dict[str, np.ndarray]:
    """Every score in ``names`` (default: all the scorer offers) for images (N, C, H, W), as float64
    arrays (N,): :func:`model_outputs`, then :meth:`Scorer.scores_from`, as /score does. A
    class-conditional model without ``labels`` scores p(x) = sum_y p(x|y) p(y) (K passes per image)."""
    names = list(names) or scorer.score_types
    scorer.check(names)
    out: dict[str, np.ndarray] = {}
    if labels is None:  # one statistics pass gives nll, complexity and dose (cached per chunk)
        stats = dataset_statistics(
            scorer, images, batch_size=batch_size, cache_dir=cache_dir, show_progress=show_progress
        )
        nll, cx = torch.from_numpy(stats["nll"]), torch.from_numpy(stats["complexity"])
        for n in names:
            if n == NLL:
                out[n] = stats["nll"]
            elif n == COMPLEXITY:
                out[n] = stats["complexity"]
            elif n == GUARDED:
                out[n] = guarded_score(cx, nll, nll_cap=scorer.nll_cap).numpy()
            elif n == DOSE:
                assert scorer.dose is not None
                out[n] = scorer.dose.score(stats)
    rest = [n for n in names if n not in out]
    if rest:
        got = model_outputs(
            scorer,
            images,
            labels,
            background=RATIO in rest,
            batch_size=batch_size,
            cache_dir=cache_dir,
            show_progress=show_progress,
        )
        bg = got.get("background_log_prob")
        outputs = ModelOutputs(
            log_prob=torch.from_numpy(got["log_prob"]),
            background_log_prob=None if bg is None else torch.from_numpy(bg),
        )
        code_bits = code_length_bits(images, levels=scorer.model.levels) if needs_code(rest) else None
        out.update({n: v.numpy() for n, v in scorer.scores_from(rest, outputs, code_bits=code_bits).items()})
    return {n: out[n] for n in names}


# ---- calibration -----------------------------------------------------------------------------------


def conformal_rank(n: int, fpr: float) -> int:
    """1-based rank k of the threshold among n sorted scores: k = ceil((n + 1)(1 - fpr)), at most n."""
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"target false-positive rate must lie in (0, 1), got {fpr}")
    if n < 1:
        raise ValueError("calibration needs at least one score")
    return min(n, math.ceil((n + 1) * (1.0 - fpr) - 1e-9))


def calibrate_scores(scores: np.ndarray, *, fpr: float = DEFAULT_FPR, n_quantiles: int = N_QUANTILES) -> dict[str, Any]:
    """Threshold and quantiles of one score's in-distribution values (N,).

    ``is_outlier = score > threshold`` flags a fresh in-distribution image with probability about
    ``fpr``; ``quantiles`` are q_0 .. q_K (K = n_quantiles, linear interpolation) for percentiles.
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if not np.isfinite(s).all():
        raise ValueError(f"{int((~np.isfinite(s)).sum())} calibration scores are not finite")
    n = len(s)
    k = conformal_rank(n, fpr)
    if (n + 1) * (1.0 - fpr) > n:
        logger.warning("%d calibration images cannot resolve a false-positive rate of %g; use more", n, fpr)
    threshold = float(s[k - 1])
    return {
        "threshold": threshold,
        "quantiles": [float(q) for q in np.quantile(s, np.linspace(0.0, 1.0, n_quantiles + 1))],
        "fpr_on_calibration": float((s > threshold).mean()),
        "mean": float(s.mean()),
        "std": float(s.std()),
    }


def calibrate(
    scorer: Scorer,
    images: Tensor,
    labels: Tensor | None = None,
    *,
    data_spec: str,
    fpr: float = DEFAULT_FPR,
    default: str | None = None,
    batch_size: int = 128,
    cache_dir: str | Path | None = None,
    show_progress: bool = True,
    keep: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The ``calibration`` entry of model.json: every score type of the scorer, calibrated on
    in-distribution held-out images (never the test set); ``keep``: entries of score types taken over
    from an earlier calibration of the same weights instead of recomputed (each records its own data).
    A class-conditional model is calibrated on
    its marginal p(x) = sum_y p(x|y) p(y) (pass no labels): the test /classify and unlabelled /score
    apply."""
    if scorer.model.n_classes is not None and labels is not None:
        raise ValueError(
            "calibrate a class-conditional model on p(x) = sum_y p(x|y) p(y), the density its outlier test "
            "uses: pass no labels"
        )
    t0 = time.perf_counter()
    # complexity_guarded's floor is the largest NLL among these images, so on them it equals complexity
    scorer.nll_cap = None
    scorer.dose = None  # refitted below
    keep = keep or {}
    names = [n for n in scorer.score_types if n not in keep]
    values = score_images(
        scorer, images, labels, names, batch_size=batch_size, cache_dir=cache_dir, show_progress=show_progress
    )
    nll_cap = float(values[NLL].max()) if NLL in values else None
    scorer.nll_cap = nll_cap  # the scorer now scores as the service will with this calibration
    dose_entry = None
    if labels is None and len(images) >= 4:
        # the statistics pass score_images made is cached (with cache_dir) or recomputed here
        stats = dataset_statistics(scorer, images, batch_size=batch_size, cache_dir=cache_dir, show_progress=False)
        fit, dose_scores, cal_idx = fit_dose(stats, statistic_names(scorer))
        scorer.dose = fit
        values[DOSE] = dose_scores
        dose_entry = {
            **fit.to_json(),
            "n_fit": len(images) - len(cal_idx),
            "n_threshold": len(cal_idx),
            "split": "densities fitted on a random half of the images (seed 0), threshold from the other half",
        }
    default = default or (DOSE if dose_entry else scorer.recommended)
    scorer.check([default])
    cal: dict[str, Any] = {
        "default_score": default,
        "target_fpr": fpr,
        "data": data_spec,
        "n": len(images),
        "method": "threshold = k-th smallest score, k = ceil((n+1)(1-target_fpr)); is_outlier = score > threshold",
        "scores": {n: {**calibrate_scores(v, fpr=fpr), **score_units(n)} for n, v in values.items()},
        "seconds": round(time.perf_counter() - t0, 1),
        "nll_cap": nll_cap,
    }
    cal["scores"].update(keep)
    if dose_entry is not None:
        cal["dose"] = dose_entry
    if scorer.prior is not None:
        cal["likelihood"] = "p(x) = sum_y p(x|y) p(y), p(y) the training class frequencies"
        cal["prior"] = [round(float(p), 8) for p in scorer.prior]
    if isinstance(scorer.model, VAE):
        cal["vae_score_k"] = scorer.vae_score_k  # the service reads it back: same k as calibrated
    cal["weights_sha256"] = scorer.weights_sha256
    cal["background_sha256"] = scorer.background_sha256
    cal["coder"] = {"name": CODER, "version": coder_version()}
    return cal


def score_units(name: str) -> dict[str, str]:
    units = "-log10 tail probability, higher = more anomalous" if name == DOSE else "bits/dim, higher = more anomalous"
    return {"units": units, "description": SCORE_TYPES[name].description}
