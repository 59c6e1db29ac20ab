"""Scoring whole data sets for ``genserve calibrate`` and ``genserve eval-ood``: the model passes
batch by batch with a progress bar, cached on disk, then the same score functions /score applies."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from models.scoring.calibration import DEFAULT_FPR, calibrate_scores
from models.scoring.coders import CODER, code_length_bits, coder_version
from models.scoring.scorer import ModelOutputs, Scorer
from models.scoring.scores import NLL, RATIO, needs_code, score_units
from models.vae import VAE
from tools.progress import progress


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
    got = model_outputs(
        scorer,
        images,
        labels,
        background=RATIO in names,
        batch_size=batch_size,
        cache_dir=cache_dir,
        show_progress=show_progress,
    )
    bg = got.get("background_log_prob")
    outputs = ModelOutputs(
        log_prob=torch.from_numpy(got["log_prob"]),
        background_log_prob=None if bg is None else torch.from_numpy(bg),
    )
    code_bits = code_length_bits(images, levels=scorer.model.levels) if needs_code(names) else None
    return {n: v.numpy() for n, v in scorer.scores_from(names, outputs, code_bits=code_bits).items()}


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
) -> dict[str, Any]:
    """The ``calibration`` entry of model.json: every score type of the scorer, calibrated on
    in-distribution held-out images (never the test set). A class-conditional model is calibrated on
    its marginal p(x) = sum_y p(x|y) p(y) (pass no labels): the test /classify and unlabelled /score
    apply."""
    if scorer.model.n_classes is not None and labels is not None:
        raise ValueError(
            "calibrate a class-conditional model on p(x) = sum_y p(x|y) p(y), the density its outlier test "
            "uses: pass no labels"
        )
    default = default or scorer.recommended
    scorer.check([default])
    t0 = time.perf_counter()
    # complexity_guarded's floor is the largest NLL among these images, so on them it equals complexity
    scorer.nll_cap = None
    values = score_images(
        scorer, images, labels, batch_size=batch_size, cache_dir=cache_dir, show_progress=show_progress
    )
    nll_cap = float(values[NLL].max()) if NLL in values else None
    scorer.nll_cap = nll_cap  # the scorer now scores as the service will with this calibration
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
    if scorer.prior is not None:
        cal["likelihood"] = "p(x) = sum_y p(x|y) p(y), p(y) the training class frequencies"
        cal["prior"] = [round(float(p), 8) for p in scorer.prior]
    if isinstance(scorer.model, VAE):
        cal["vae_score_k"] = scorer.vae_score_k  # the service reads it back: same k as calibrated
    cal["weights_sha256"] = scorer.weights_sha256
    cal["background_sha256"] = scorer.background_sha256
    cal["coder"] = {"name": CODER, "version": coder_version()}
    return cal
