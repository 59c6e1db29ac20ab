"""``genserve probe``: the logistic-regression probe on constructed features, and the command end to
end on a tiny VAE with npz data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import save_checkpoint
from models.pixelcnn import PixelCNN, PixelCNNConfig
from models.tools.cli import main
from models.tools.probe import encode_all, fit_logistic, predict, probe_accuracy
from models.vae import VAE, VAEConfig
from tests.helpers import TINY_PIXELCNN, TINY_VAE, dataset_meta


def blobs(n: int, seed: int, spread: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Three Gaussian blobs in 5-d around fixed, well separated centres."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[4.0, 0, 0, 0, 0], [0, 4.0, 0, 0, 0], [0, 0, 4.0, 0, 0]])
    y = torch.arange(n) % 3
    return centres[y] + spread * torch.randn(n, 5, generator=g), y


def test_the_probe_separates_separable_classes_and_not_random_labels():
    x, y = blobs(300, 0, spread=0.5)
    xt, yt = blobs(150, 1, spread=0.5)
    acc = probe_accuracy(x, y, xt, yt, 3, l2=1e-4)
    assert acc["train_accuracy"] == 1.0 and acc["test_accuracy"] == 1.0
    shuffled = y[torch.randperm(300, generator=torch.Generator().manual_seed(2))]
    chance = probe_accuracy(x, shuffled, xt, yt, 3, l2=1e-4)
    assert chance["test_accuracy"] < 0.6  # labels unrelated to the features: no better than chance (1/3) by much


def test_the_fit_is_the_regularised_optimum():
    """At the fitted weights the gradient of the loss vanishes; a larger penalty gives smaller weights."""
    x, y = blobs(120, 3, spread=1.5)
    w, b, mean, std = fit_logistic(x, y, 3, l2=1e-3)
    z = ((x.double() - mean) / std).requires_grad_(False)
    w_, b_ = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(z @ w_ + b_, y) + 1e-3 * (w_ * w_).sum()
    loss.backward()
    assert w_.grad is not None and b_.grad is not None
    assert float(w_.grad.abs().max()) < 1e-5 and float(b_.grad.abs().max()) < 1e-5
    w_big, *_ = fit_logistic(x, y, 3, l2=1e-1)
    assert float(w_big.norm()) < float(w.norm())
    assert torch.equal(predict(x, (w, b, mean, std)), predict(x, fit_logistic(x, y, 3, l2=1e-3)))  # deterministic


def labelled_npz(path: Path, n: int, seed: int) -> str:
    """Images whose class sets their brightness: bright, mid, dark noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    base = np.array([200, 100, 10])[labels][:, None, None]
    images = np.clip(base + rng.integers(0, 40, size=(n, 8, 8)), 0, 255).astype(np.uint8)
    np.savez(path, images=images, labels=labels)
    return f"npz:{path}"


def test_probe_command_on_a_tiny_vae(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    torch.manual_seed(0)
    model = VAE(VAEConfig(**TINY_VAE))
    save_checkpoint(model, tmp_path / "vae", dataset=dataset_meta())
    train, test = labelled_npz(tmp_path / "a.npz", 90, 0), labelled_npz(tmp_path / "b.npz", 30, 1)
    argv = ["probe", "--model", str(tmp_path / "vae"), "--train", train, "--test", test]
    assert main([*argv, "--report", str(tmp_path / "r" / "probe.json")]) == 0
    report = json.loads((tmp_path / "r" / "probe.json").read_text())
    assert report == json.loads(capsys.readouterr().out)
    assert report["n_train"] == 90 and report["n_test"] == 30 and report["latent_dim"] == 4
    # brightness classes are easy: even an untrained encoder's code separates them, and raw pixels do
    assert report["latent"]["test_accuracy"] >= 0.9 and report["pixels"]["test_accuracy"] == 1.0
    mean, std = encode_all(model.eval(), torch.from_numpy(np.load(tmp_path / "b.npz")["images"])[:, None], batch_size=7)
    assert mean.shape == std.shape == (30, 4) and bool((std > 0).all())
    assert main([*argv, "--features", "mean+std"]) == 0
    assert json.loads(capsys.readouterr().out)["features"] == "mean and log std"
    save_checkpoint(PixelCNN(PixelCNNConfig(**TINY_PIXELCNN)), tmp_path / "pc", dataset=dataset_meta())
    assert main(["probe", "--model", str(tmp_path / "pc"), "--train", train, "--test", test]) == 2
