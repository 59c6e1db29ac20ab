"""``genserve probe``: how useful a VAE's latent code is as features, by a linear probe.

The encoder q(z|x) maps each image to the mean and standard deviation of a diagonal Gaussian
(each (latent_dim,)). A multinomial logistic regression fitted on the training images' features
(standardised, L2-penalised, full-batch L-BFGS in float64, so the fit is deterministic) and
evaluated on the test images' features measures how much class information the code carries
without any label ever reaching the VAE. The same probe on raw pixels is reported beside it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from models.checkpoint import load_checkpoint
from models.tools.data import load_dataset
from models.vae import VAE


@torch.inference_mode()
def encode_all(model: VAE, images: Tensor, *, batch_size: int = 500) -> tuple[Tensor, Tensor]:
    """Latent mean and std for images (N, C, H, W): each (N, latent_dim), float32 on the CPU."""
    means, stds = [], []
    for s in range(0, len(images), batch_size):
        m, sd = model.encode(images[s : s + batch_size].to(model.device))
        means.append(m.float().cpu())
        stds.append(sd.float().cpu())
    return torch.cat(means), torch.cat(stds)


def fit_logistic(
    x: Tensor, y: Tensor, n_classes: int, *, l2: float = 1e-4, max_iter: int = 500
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Multinomial logistic regression on features x (N, D) and labels y (N,).

    Features are standardised by the training mean and std; the loss is the mean cross-entropy plus
    ``l2`` * ||W||^2 (bias unpenalised). Returns (W (D, K), b (K,), mean (D,), std (D,)), float64.
    """
    x = x.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
    z = (x - mean) / std
    w = torch.zeros(z.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe"
    )
    target = y.long()

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ w + b, target) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach(), mean, std


def predict(x: Tensor, params: tuple[Tensor, Tensor, Tensor, Tensor]) -> Tensor:
    """Predicted class (N,) for features x (N, D) under fitted ``params`` (see :func:`fit_logistic`)."""
    w, b, mean, std = params
    return (((x.double() - mean) / std) @ w + b).argmax(1)


def probe_accuracy(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, n_classes: int, *, l2: float
) -> dict[str, float]:
    """Train and test accuracy of a logistic regression fitted on (train_x, train_y)."""
    params = fit_logistic(train_x, train_y, n_classes, l2=l2)
    return {
        "train_accuracy": float((predict(train_x, params) == train_y).double().mean()),
        "test_accuracy": float((predict(test_x, params) == test_y).double().mean()),
    }


def run(
    model_folder: str | Path,
    *,
    train_spec: str = "fashion-mnist:train-full",
    test_spec: str = "fashion-mnist:test",
    features: str = "mean",
    l2: float = 1e-4,
    device: str = "cpu",
    batch_size: int = 500,
    pixel_baseline: bool = True,
    command: str = "",
) -> dict[str, Any]:
    """The probe's report: accuracies from the latent features (and from raw pixels)."""
    t0 = time.perf_counter()
    model, meta = load_checkpoint(model_folder, device)
    if not isinstance(model, VAE):
        raise ValueError(f"{model_folder} is a {model.architecture} model; the probe reads a VAE's encoder")
    if features not in ("mean", "mean+std"):
        raise ValueError(f"features must be 'mean' or 'mean+std', got '{features}'")
    train, test = load_dataset(train_spec), load_dataset(test_spec)
    if train.labels is None or test.labels is None:
        raise ValueError("the probe needs labelled training and test data")
    k = int(max(int(train.labels.max()), int(test.labels.max())) + 1)

    def feats(images: Tensor) -> Tensor:
        mean, std = encode_all(model, images, batch_size=batch_size)
        return mean if features == "mean" else torch.cat([mean, std.log()], dim=1)

    report: dict[str, Any] = {
        "model": str(model_folder),
        "weights_sha256": meta["weights"]["sha256"],
        "train": train_spec,
        "test": test_spec,
        "n_train": len(train),
        "n_test": len(test),
        "features": features if features == "mean" else "mean and log std",
        "latent_dim": model.config.latent_dim,
        "l2": l2,
        "latent": probe_accuracy(feats(train.images), train.labels, feats(test.images), test.labels, k, l2=l2),
    }
    if pixel_baseline:
        px = lambda d: d.images.flatten(1).double() / (model.levels - 1)  # noqa: E731
        report["pixels"] = probe_accuracy(px(train), train.labels, px(test), test.labels, k, l2=l2)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["command"] = command
    return report
