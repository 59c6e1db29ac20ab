"""Test-set likelihoods: NLL in nats per image and bits/dim, batched, with a progress bar."""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from models.base import DensityModel
from models.files import atomic_write
from models.likelihood import bits_per_dim
from models.tools.data import ImageDataset
from models.tools.progress import progress
from models.vae import VAE


def _weights_digest(model: DensityModel) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Partial:
    """Per-image results saved as they are computed, so a long evaluation that is stopped resumes.

    One safetensors file per (model weights, model config, data, score) under ``folder``; holds
    the rows done so far. A file written for anything else is never picked up.
    """

    def __init__(self, folder: str | Path, model: DensityModel, data: ImageDataset, fn: str, every_s: float = 60.0):
        key = json.dumps(
            {
                "weights": _weights_digest(model),
                "config": repr(model.config),
                "data": data.spec,
                "n": len(data),
                "images": hashlib.sha256(data.images.numpy().tobytes()).hexdigest(),
                "fn": fn,
            },
            sort_keys=True,
        )
        self.path = Path(folder) / f"{fn}-{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors"
        self.every_s = every_s
        self.last = time.monotonic()

    def load(self) -> Tensor | None:
        return load_file(self.path)["values"] if self.path.is_file() else None

    def save(self, values: Tensor, *, force: bool = False) -> None:
        if force or time.monotonic() - self.last >= self.every_s:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            flat = {"values": values.detach().float().cpu().contiguous()}
            atomic_write(self.path, lambda tmp: save_file(flat, str(tmp)))
            self.last = time.monotonic()


@torch.no_grad()
def score_dataset(
    model: DensityModel,
    data: ImageDataset,
    *,
    batch_size: int = 256,
    show_progress: bool = True,
    fn: str = "log_prob",
    partial_dir: str | Path | None = None,
) -> Tensor:
    """Per-image values of ``model.<fn>(x[, y])`` (nats), shape (N,), on the model's device.

    ``partial_dir``: keep the rows done so far there (about once a minute) and resume from them.
    """
    dev = model.device
    out: list[Tensor] = []
    n = len(data)
    partial = Partial(partial_dir, model, data, fn) if partial_dir else None
    done = partial.load() if partial else None
    first = 0
    if done is not None and len(done):
        out.append(done.to(dev))
        first = len(done)
    starts = range(first, n, batch_size)
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
        elif fn == "kl" and isinstance(model, VAE):
            # KL(q(z|x) || N(0, I)) in nats: how much the code says about each image (0 = unused).
            mean, std = model.encode(x)
            out.append(0.5 * (mean.pow(2) + std.pow(2) - 1.0 - 2.0 * std.log()).sum(1))
        else:
            raise ValueError(f"unknown score '{fn}'")
        if partial:
            partial.save(torch.cat(out))
    if partial:
        partial.save(torch.cat(out), force=True)
    return torch.cat(out).float()


def evaluate(
    model: DensityModel,
    data: ImageDataset,
    *,
    batch_size: int = 256,
    show_progress: bool = True,
    partial_dir: str | Path | None = None,
) -> dict[str, Any]:
    """NLL report over a dataset: bits/dim, nats/image; for a VAE the IWAE estimate and the ELBO.

    ``partial_dir``: see :func:`score_dataset` (resume a stopped evaluation).
    """
    if data.shape != model.shape:
        raise ValueError(f"{data.spec} holds {data.shape} images; the model takes {model.shape}")
    t0 = time.perf_counter()
    el: Tensor | None = None
    if isinstance(model, VAE):
        model.prepare_for_inference()  # k decoder passes per image: channels-last on CPU
        both = score_dataset(
            model, data, batch_size=batch_size, show_progress=show_progress, fn="iwae_and_elbo", partial_dir=partial_dir
        )
        lp, el = both[:, 0], both[:, 1]
    else:
        lp = score_dataset(model, data, batch_size=batch_size, show_progress=show_progress, partial_dir=partial_dir)
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
        kl = score_dataset(model, data, batch_size=batch_size, show_progress=False, fn="kl")
        report["kl_nats_per_image"] = float(kl.mean())
    return report
