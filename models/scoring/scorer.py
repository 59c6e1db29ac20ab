"""The :class:`Scorer`: one loaded model (and its background companion) turned into outlier scores.

It is the only path the service, ``genserve calibrate`` and ``genserve eval-ood`` use, so a
calibrated threshold always judges the function it was computed from.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from models.base import AutoregressiveModel, DensityModel
from models.checkpoint import META, load_checkpoint
from models.scoring.classify import check_prior, class_log_likelihood, posterior_from, training_prior, uniform_prior
from models.scoring.coders import CODER, code_length_bits
from models.scoring.dose import DoseFit
from models.scoring.scores import (
    COMPLEXITY,
    DOSE,
    GUARDED,
    NLL,
    RATIO,
    available_score_types,
    complexity_score,
    guarded_score,
    likelihood_ratio_score,
    needs_code,
    nll_score,
    pixel_anomaly,
    recommended_score,
)
from models.scoring.statistics import COMPANION_PREFIX, model_statistics
from models.vae import VAE

BACKGROUND = "background"  # a model folder's background model (Ren et al.)
COMPANION = "companion"  # a model folder's companion model, whose statistics its dose score may combine
# IWAE samples behind a VAE's outlier scores (the served ones and their calibration): log_prob's
# iwae_samples cost a hundred decoder passes; docs/ood.md compares k.
DEFAULT_VAE_SCORE_K = 1


def calibrated_dose(meta: dict[str, Any]) -> DoseFit | None:
    """The dose densities a checkpoint's calibration fitted, if any."""
    d = (meta.get("calibration") or {}).get("dose")
    return DoseFit.from_json(d) if d else None


def uses_companion(meta: dict[str, Any]) -> bool:
    """True if a checkpoint's dose score combines its companion model's statistics."""
    d = (meta.get("calibration") or {}).get("dose") or {}
    return any(str(s.get("name", "")).startswith(COMPANION_PREFIX) for s in d.get("statistics", []))


def has_dose(meta: dict[str, Any]) -> bool:
    """True if a checkpoint's calibration fitted the dose score (without parsing the fit)."""
    return bool((meta.get("calibration") or {}).get("dose"))


def has_background(folder: str | Path) -> bool:
    """True if a model folder holds a background model in ``<folder>/background/``."""
    return (Path(folder) / BACKGROUND / META).is_file()


def has_companion(folder: str | Path) -> bool:
    """True if a model folder holds a companion model in ``<folder>/companion/``."""
    return (Path(folder) / COMPANION / META).is_file()


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
    """Outlier scores of one model, with its background model and its companion where it has them.

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
        companion: Scorer | None = None,
        with_transpose: bool = False,
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
        if companion is not None:
            c = companion.model
            if c.shape != model.shape or c.levels != model.levels or c.n_classes is not None:
                raise ValueError(
                    f"a companion model must be unconditional and take the model's {model.shape} images with "
                    f"{model.levels} levels; it takes {c.shape} with {c.levels}"
                    f"{' and labels' if c.n_classes is not None else ''}"
                )
        if vae_score_k < 1:
            raise ValueError(f"vae_score_k must be at least 1, got {vae_score_k}")
        self.model: DensityModel = model
        self.background = background
        self.vae_score_k = vae_score_k
        self.weights_sha256 = weights_sha256
        self.background_sha256 = background_sha256
        self.prior = prior
        self.nll_cap = nll_cap  # bits/dim: the calibration images' largest NLL (complexity_guarded's floor)
        self.dose = dose  # the fitted densities of the dose score (from the calibration)
        self.companion: Scorer | None = companion
        # before a calibration: whether the statistics pass scores the transposes too (models/scoring/statistics.py)
        self.with_transpose = with_transpose

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
        batch = self._dose(x, y) if DOSE in names else ScoreBatch(log_prob={}, scores={}, heatmaps={})
        if others or heatmap:
            o = self.outputs(x, y, background=RATIO in others, pixels=heatmap)
            code_bits = code_length_bits(x, levels=self.model.levels) if needs_code(others) else None
            batch.scores.update(self.scores_from(others, o, code_bits=code_bits))
            batch.log_prob.update(dict.fromkeys(others, o.log_prob))
            if batch.class_log_likelihood is None:
                batch.class_log_likelihood = o.class_log_likelihood
            if o.pixel_log_prob is not None:
                for n in names:
                    bg = o.background_pixel_log_prob if n == RATIO else None
                    batch.heatmaps[n] = pixel_anomaly(o.pixel_log_prob, background_pixel_log_prob=bg)
        return batch

    def _dose(self, x: Tensor, y: Tensor | None) -> ScoreBatch:
        """The dose score of images x (B, C, H, W) from one statistics pass (models/scoring/statistics.py),
        with each statistic's value, tail probability and share of the score, for the explanation."""
        assert self.dose is not None
        if y is not None:
            raise ValueError("the dose score judges p(x); a class-conditional model's p(x|y) has no calibration")
        stats, raw = model_statistics(self, x, with_raw=True)
        arrays = {k: v.numpy() for k, v in stats.items()}
        log10_p, parts = self.dose.explain_arrays(arrays)  # (B, S) each; parts' rows sum to the score
        return ScoreBatch(
            log_prob={DOSE: raw["log_prob"].cpu()},
            scores={DOSE: torch.from_numpy(parts.sum(axis=1))},
            heatmaps={},
            class_log_likelihood=raw.get("class_log_likelihood"),
            dose_values=torch.stack([stats[n] for n in self.dose.statistics], dim=1),
            dose_log10_p=torch.from_numpy(log10_p),
            dose_contributions=torch.from_numpy(parts),
        )


def load_scorer(
    folder: str | Path, device: str | torch.device = "cpu", *, vae_score_k: int | None = None
) -> tuple[Scorer, dict[str, Any]]:
    """A model folder's scorer: the model, its ``background/`` and ``companion/`` models if present
    (same device), and the VAE score k recorded by its calibration (``vae_score_k`` overrides it).
    Returns (scorer, the model's metadata)."""
    folder = Path(folder)
    model, meta = load_checkpoint(folder, device)
    background, bg_meta = None, None
    if has_background(folder):
        background, bg_meta = load_checkpoint(folder / BACKGROUND, device)
    companion = load_scorer(folder / COMPANION, device)[0] if has_companion(folder) else None
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
        companion=companion,
    )
    return scorer, meta


def stale_calibration(
    meta: dict[str, Any], background_meta: dict[str, Any] | None, companion_meta: dict[str, Any] | None = None
) -> str | None:
    """Why a checkpoint's calibration does not fit its weights (or its background's or companion's),
    else None."""
    cal = meta.get("calibration") or {}
    if not cal:
        return None
    if cal.get("weights_sha256") and cal["weights_sha256"] != meta["weights"].get("sha256"):
        return "it was computed for other weights"
    bg_sha = background_meta["weights"].get("sha256") if background_meta else None
    if "background_sha256" in cal and cal["background_sha256"] != bg_sha:
        return "it was computed with another background model"
    if uses_companion(meta):
        comp_sha = companion_meta["weights"].get("sha256") if companion_meta else None
        if comp_sha is None:
            return "its dose score combines a companion model's statistics, and companion/ is missing"
        if cal.get("companion_sha256") != comp_sha:
            return "it was computed with another companion model"
    if cal.get("prior") is not None:
        now = training_prior(meta, len(cal["prior"])).tolist()
        if any(abs(a - b) > 1e-6 for a, b in zip(now, cal["prior"], strict=True)):
            return "it used another class prior p(y) than dataset.class_counts gives"
    coder = (cal.get("coder") or {}).get("name")
    if coder and coder != CODER:
        return f"its complexity score used the coder '{coder}', this genserve uses '{CODER}'"
    return None
