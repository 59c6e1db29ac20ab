"""Test-set likelihoods: NLL in nats per image and bits/dim, batched, with a progress bar."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor

from models.base import DensityModel
from models.data import ImageDataset
from models.likelihood import bits_per_dim
from models.vae import VAE


def progress(iterable: Any, *, total: int | None = None, desc: str = "", enabled: bool = True, initial: int = 0) -> Any:
    """tqdm when installed and enabled, else the iterable itself; ``initial``: steps already done
    (a resumed epoch), counted in the bar but not in ``iterable``."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, mininterval=1.0, initial=initial)


@torch.no_grad()
def score_dataset(
    model: DensityModel,
    data: ImageDataset,
    *,
    batch_size: int = 256,
    show_progress: bool = True,
    fn: str = "log_prob",
) -> Tensor:
    """Per-image values of ``model.<fn>(x[, y])`` (nats), shape (N,), on the model's device."""
    dev = model.device
    out = []
    n = len(data)
    starts = range(0, n, batch_size)
    for s in progress(starts, total=len(starts), desc=f"{fn}", enabled=show_progress):
        x = data.images[s : s + batch_size].to(dev)
        y = None
        if model.n_classes is not None:
            if data.labels is None:
                raise ValueError(f"{data.spec} has no labels; a class-conditional model needs them")
            y = data.labels[s : s + batch_size].to(dev)
        if fn == "log_prob":
            out.append(model.log_prob(x, y))
        elif fn == "iwae_and_elbo" and isinstance(model, VAE):
            # One set of importance weights gives both estimates: (N, 2) = [IWAE, ELBO].
            lw = model.log_weights(x, model.config.iwae_samples)
            out.append(torch.stack([torch.logsumexp(lw, 1) - math.log(lw.shape[1]), lw.mean(1)], dim=1))
        else:
            raise ValueError(f"unknown score '{fn}'")
    return torch.cat(out).float()


def evaluate(
    model: DensityModel, data: ImageDataset, *, batch_size: int = 256, show_progress: bool = True
) -> dict[str, Any]:
    """NLL report over a dataset: bits/dim, nats/image; for a VAE the IWAE estimate and the ELBO."""
    if data.shape != model.shape:
        raise ValueError(f"{data.spec} holds {data.shape} images; the model takes {model.shape}")
    t0 = time.perf_counter()
    el: Tensor | None = None
    if isinstance(model, VAE):
        both = score_dataset(model, data, batch_size=batch_size, show_progress=show_progress, fn="iwae_and_elbo")
        lp, el = both[:, 0], both[:, 1]
    else:
        lp = score_dataset(model, data, batch_size=batch_size, show_progress=show_progress)
    report: dict[str, Any] = {
        "data": data.spec,
        "n": len(data),
        "nats_per_image": float(-lp.mean()),
        "bits_per_dim": float(bits_per_dim(lp.mean(), model.dims)),
        "bits_per_dim_stderr": float(lp.std() / (model.dims * math.log(2)) / math.sqrt(len(data))),
        "exact": model.exact,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if isinstance(model, VAE) and el is not None:
        report["estimator"] = f"IWAE, k={model.config.iwae_samples} (a lower bound on log p in expectation)"
        report["elbo_bits_per_dim"] = float(bits_per_dim(el.mean(), model.dims))
        report["elbo_nats_per_image"] = float(-el.mean())
    return report
