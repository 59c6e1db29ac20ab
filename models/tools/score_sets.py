"""Scoring whole data sets for ``genserve calibrate`` and ``genserve eval-ood``: the model passes
batch by batch with a progress bar, cached on disk, then the same score functions /score applies."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from models.files import atomic_write
from models.scoring.calibration import DEFAULT_FPR, calibrate_scores
from models.scoring.coders import CODER, code_length_bits, coder_version
from models.scoring.colour import ColourCheck
from models.scoring.dose import DEFAULT_NEIGHBOURS, fit_dose
from models.scoring.extent import DEFAULT_TOLERANCE as EXTENT_TOLERANCE
from models.scoring.extent import ExtentCheck
from models.scoring.peak import DEFAULT_TOLERANCE as PEAK_TOLERANCE
from models.scoring.peak import PeakCheck
from models.scoring.scorer import ModelOutputs, Scorer
from models.scoring.scores import COMPLEXITY, DOSE, GUARDED, NLL, RATIO, guarded_score, needs_code, score_units
from models.scoring.statistics import (
    COMPANION_PREFIX,
    STATS_VERSION,
    companion_names,
    own_statistic_names,
    own_statistics,
    statistic_names,
)
from models.tools.progress import progress
from models.vae import VAE

logger = logging.getLogger(__name__)


def save_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Keep ``arrays`` in the npz cache file ``path``, atomically. A cache is only a shortcut: a full
    disk (or any write error) is logged and the run goes on without it."""

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub types the kwargs as its bool flag

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, write)
    except OSError as e:
        logger.warning("not caching %s: %s", path, e)


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
            save_cache(path, cached)
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
        out = _from_statistics(scorer, images, names, batch_size, cache_dir, show_progress)
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


def _from_statistics(
    scorer: Scorer,
    images: Tensor,
    names: Sequence[str],
    batch_size: int,
    cache_dir: str | Path | None,
    show_progress: bool,
) -> dict[str, np.ndarray]:
    """The scores in ``names`` that the statistics pass gives (nll, complexity, complexity_guarded, dose)."""
    stats = dataset_statistics(scorer, images, batch_size=batch_size, cache_dir=cache_dir, show_progress=show_progress)
    nll, cx = torch.from_numpy(stats["nll"]), torch.from_numpy(stats["complexity"])
    out: dict[str, np.ndarray] = {}
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
    return out


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
    statistics: Sequence[str] | None = None,
    confidence: float | None = None,
    folds: int = 0,
    neighbours: int = DEFAULT_NEIGHBOURS,
    colour: ColourCheck | None = ColourCheck(),
    peak_tolerance: int | None = PEAK_TOLERANCE,
    extent_tolerance: int | None = EXTENT_TOLERANCE,
) -> dict[str, Any]:
    """The ``calibration`` entry of model.json: every score type of the scorer, calibrated on held-out
    in-distribution images (never the test set); ``keep``: entries kept from an earlier calibration of
    the same weights. Without labels dose is fitted too and becomes the default (:func:`_fit_dose`:
    ``statistics``, default all; ``neighbours``, 0 for Mahalanobis; ``folds``). With ``confidence`` each
    threshold's false-positive rate is at most ``fpr`` with that probability, else about ``fpr``. A
    class-conditional model is calibrated on p(x) = sum_y p(x|y) p(y) (pass no labels). ``colour``,
    ``peak_tolerance`` and ``extent_tolerance`` (None: none): the checks of :func:`upload_checks`."""
    if scorer.model.n_classes is not None and labels is not None:
        raise ValueError(f"calibrate a class-conditional model on p(x) = sum_y p(x|y) p(y), {_NO_LABELS}")
    t0 = time.perf_counter()
    scorer.nll_cap, scorer.dose = None, None  # both refitted below (the floor: the largest NLL of these images)
    scorer.with_transpose = "transpose" in (statistics or ())  # the one statistic that costs a pass of its own
    keep = keep or {}
    names = [n for n in scorer.score_types if n not in keep]
    values = score_images(
        scorer, images, labels, names, batch_size=batch_size, cache_dir=cache_dir, show_progress=show_progress
    )
    scorer.nll_cap = nll_cap = _nll_cap(values, keep)  # the scorer now scores as the service will with it
    dose_entry = None
    if labels is None and len(images) >= 4:
        dose_entry = _fit_dose(scorer, images, values, batch_size, cache_dir, statistics, folds, neighbours)
    default = default or (DOSE if dose_entry else scorer.recommended)
    scorer.check([default])
    cal: dict[str, Any] = {
        "default_score": default,
        "target_fpr": fpr,
        "data": data_spec,
        "n": len(images),
        "method": _method(confidence),
        "confidence": confidence,
        "scores": {
            **{n: {**calibrate_scores(v, fpr=fpr, confidence=confidence), **score_units(n)} for n, v in values.items()},
            **keep,
        },
        "seconds": round(time.perf_counter() - t0, 1),
        "nll_cap": nll_cap,
    }
    checks = upload_checks(scorer, images, colour, peak_tolerance, extent_tolerance)
    return {**cal, **({"dose": dose_entry} if dose_entry else {}), **checks, **_provenance(scorer)}


def upload_checks(
    scorer: Scorer,
    images: Tensor,
    colour: ColourCheck | None,
    peak_tolerance: int | None,
    extent_tolerance: int | None = EXTENT_TOLERANCE,
) -> dict[str, Any]:
    """The checks that refuse an image whatever its score, as calibration entries: ``colour`` for a
    model of grayscale images (no colour is in its training data), ``peak`` (the dimmest brightest
    pixel among the calibration ``images`` (N, C, H, W) levels, :mod:`models.scoring.peak`) and
    ``extent`` (the least frame any of them spans, :mod:`models.scoring.extent`); None: not that check."""
    out: dict[str, Any] = {}
    if colour is not None and scorer.model.shape[0] == 1:
        out["colour"] = colour.to_json()
    if peak_tolerance is not None:
        out["peak"] = PeakCheck.fit(images.numpy(), scorer.model.levels, peak_tolerance).to_json()
    if extent_tolerance is not None:
        out["extent"] = ExtentCheck.fit(images.numpy(), scorer.model.levels, extent_tolerance).to_json()
    return out


def _nll_cap(values: dict[str, np.ndarray], keep: dict[str, dict[str, Any]]) -> float | None:
    """complexity_guarded's floor, bits/dim: the largest NLL among the calibration images, or the one a
    kept complexity_guarded entry was calibrated with (its threshold holds only with its own floor)."""
    if GUARDED in keep and keep[GUARDED].get("nll_cap") is not None:
        return float(keep[GUARDED]["nll_cap"])
    return float(values[NLL].max()) if NLL in values else None


_NO_LABELS = "the density its outlier test uses: pass no labels"


def _method(confidence: float | None) -> str:
    """How the thresholds were picked, in words, for model.json."""
    if confidence is None:
        return "threshold = k-th smallest score, k = ceil((n+1)(1-target_fpr)); is_outlier = score > threshold"
    return (
        f"threshold = the (n-a)-th smallest score, a the largest with P(Binomial(n, target_fpr) <= a) <= "
        f"{1 - confidence:.3g}, so that the true false-positive rate is at most target_fpr with probability "
        f"{confidence:g}; is_outlier = score > threshold"
    )


def _provenance(scorer: Scorer) -> dict[str, Any]:
    """What a calibration depends on besides its images: the class prior, the VAE's k, both models'
    weights and the coder (the service checks them against what it loads)."""
    out: dict[str, Any] = {}
    if scorer.prior is not None:
        out["likelihood"] = "p(x) = sum_y p(x|y) p(y), p(y) the training class frequencies"
        out["prior"] = [round(float(p), 8) for p in scorer.prior]
    if isinstance(scorer.model, VAE):
        out["vae_score_k"] = scorer.vae_score_k  # the service reads it back: same k as calibrated
    out["weights_sha256"] = scorer.weights_sha256
    out["background_sha256"] = scorer.background_sha256
    if scorer.dose is not None and any(n.startswith(COMPANION_PREFIX) for n in scorer.dose.statistics):
        assert scorer.companion is not None
        out["companion_sha256"] = scorer.companion.weights_sha256
    out["coder"] = {"name": CODER, "version": coder_version()}
    return out


def _fit_dose(
    scorer: Scorer,
    images: Tensor,
    values: dict[str, np.ndarray],
    batch_size: int,
    cache_dir: str | Path | None,
    statistics: Sequence[str] | None = None,
    folds: int = 0,
    neighbours: int = 0,
) -> dict[str, Any]:
    """Fit the dose score's densities and put the scores its threshold comes from into ``values``
    (:func:`models.scoring.dose.fit_dose`: with ``neighbours``, every image scored against the
    others; else ``folds`` 0, a random half scored by a fit on the other, or k, every image scored by
    a fit on the other k - 1 folds); sets ``scorer.dose``. Returns the entry."""
    # the statistics pass score_images made is cached (with cache_dir) or recomputed here
    names = statistic_names(scorer)
    unknown = [n for n in statistics or () if n not in names]
    if unknown:
        raise ValueError(f"unknown statistic(s) {unknown}; this model gives {names}")
    stats = dataset_statistics(scorer, images, batch_size=batch_size, cache_dir=cache_dir, show_progress=False)
    if neighbours > (len(images) - 1) // 2:  # a tiny calibration (a test's, a smoke run's): fewer neighbours
        logger.warning(
            "%d calibration images: dose with %d neighbours, not %d", len(images), (len(images) - 1) // 2, neighbours
        )
        neighbours = (len(images) - 1) // 2
    fit, dose_scores, cal_idx = fit_dose(stats, list(statistics or names), folds=folds, neighbours=neighbours)
    scorer.dose = fit
    values[DOSE] = dose_scores
    if neighbours:
        split = (
            "densities fitted on all the images; the threshold from every image's score against the other "
            "images (leave-one-out: no image is its own neighbour)"
        )
    elif folds:
        split = (
            f"{folds}-fold cross-fit (seed 0): the threshold from every image's score under a fit on the other "
            f"folds; the densities served are fitted on all the images"
        )
    else:
        split = "densities fitted on a random half of the images (seed 0), threshold from the other half"
    return {
        **fit.to_json(),
        "n_fit": len(images) if folds or neighbours else len(images) - len(cal_idx),
        "n_threshold": len(cal_idx),
        "split": split,
    }


CHUNK = 256  # images per cache file


def dataset_statistics(
    scorer: Scorer,
    images: Tensor,
    *,
    batch_size: int = 64,
    cache_dir: str | Path | None = None,
    show_progress: bool = True,
) -> dict[str, np.ndarray]:
    """:func:`model_statistics` of images (N, C, H, W), as float64 arrays (N,) per statistic. With
    ``cache_dir`` each chunk of 256 images is kept in ``cache_dir/<key>.npz`` (key: the scorer's
    fingerprint, :data:`STATS_VERSION` and the chunk's bytes), so an interrupted run resumes and a
    rerun, or ``calibrate`` after ``eval-ood``, costs no model pass. A companion's statistics
    (prefixed ``companion_``) come from the same function on the companion, cached under its own key,
    so one companion's pass serves every model that has it."""
    names = own_statistic_names(scorer)
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    starts = range(0, len(images), CHUNK)
    for s in progress(starts, total=len(starts), desc="statistics", enabled=show_progress):
        chunk = images[s : s + CHUNK]
        path = None
        got: dict[str, np.ndarray] = {}
        if cache_dir is not None:
            h = hashlib.sha256(f"{scorer.fingerprint}/{STATS_VERSION}".encode())
            h.update(chunk.numpy().tobytes())
            path = Path(cache_dir) / f"stats-{h.hexdigest()[:24]}.npz"
            if path.is_file():
                with np.load(path) as f:
                    got = {k: f[k] for k in f.files}
        if not all(n in got for n in names):
            dev = scorer.model.device
            steps = range(0, len(chunk), batch_size)
            pieces = [own_statistics(scorer, chunk[i : i + batch_size].to(dev)) for i in steps]
            got = {n: torch.cat([p[n] for p in pieces]).numpy() for n in names}
            if path is not None:
                save_cache(path, got)
        for n in names:
            parts[n].append(got[n])
    out = {n: np.concatenate(v) if v else np.zeros(0) for n, v in parts.items()}
    wanted = companion_names(scorer)
    if wanted:
        assert scorer.companion is not None
        theirs = dataset_statistics(
            scorer.companion, images, batch_size=batch_size, cache_dir=cache_dir, show_progress=show_progress
        )
        out.update({COMPANION_PREFIX + n: theirs[n] for n in wanted})
    return out
