"""genserve calibrate --reencode: calibration images re-encoded as a pipeline sends them, converted
back through /score's own conversion (models/tools/reencode.py)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import read_metadata, save_checkpoint
from models.image_convert import file_to_levels
from models.pixelcnn import PixelCNN, PixelCNNConfig
from models.tools.cli import main
from models.tools.reencode import WAYS, reencode, reencode_file
from tests.helpers import TINY_PIXELCNN, dataset_meta


def garments(n: int, size: int = 28, seed: int = 0) -> torch.Tensor:
    """Bright blobs on black, (n, 1, size, size) uint8: smooth enough for JPEG to keep them close."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.zeros((n, 1, size, size), np.uint8)
    for i in range(n):
        cy, cx = rng.uniform(size * 0.3, size * 0.7, 2).tolist()
        r = rng.uniform(size / 7, size / 3.5)
        out[i, 0] = np.clip(255 * (1.5 - np.hypot(yy - cy, xx - cx) / r), 0, 255).astype(np.uint8)
    return torch.from_numpy(out)


def test_a_third_stay_exact_the_rest_change_a_little_and_each_is_what_score_makes_of_its_file():
    x = garments(9)
    y = reencode(x, 256, seed=3)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(reencode(x, 256, seed=3), y)  # seeded
    for i in range(9):
        diff = (y[i].int() - x[i].int()).abs()
        if WAYS[i % 3] == "exact":
            assert torch.equal(y[i], x[i])
        else:
            assert diff.max() > 0 and diff.float().mean() < 6.0, i  # re-encoded, still the same picture
    rng = random.Random(3)  # the files themselves, through the service's conversion
    for i in range(9):
        data, suffix = reencode_file(x[i].numpy(), WAYS[i % 3], rng)
        assert suffix in (".png", ".jpg")
        assert np.array_equal(file_to_levels(data, (1, 28, 28), 256), y[i].numpy())


def test_reencode_keeps_fewer_levels_and_refuses_other_shapes():
    x = garments(3) // 16  # 16 levels
    y = reencode(x, 16)
    assert int(y.max()) <= 15 and torch.equal(y[0], x[0])
    with pytest.raises(ValueError, match="1- or 3-channel"):
        reencode(torch.zeros(2, 2, 8, 8, dtype=torch.uint8), 256)


def test_calibrate_reencode_records_it_and_moves_the_thresholds(tmp_path: Path):
    torch.manual_seed(0)
    folder = tmp_path / "m"
    save_checkpoint(PixelCNN(PixelCNNConfig(**TINY_PIXELCNN)), folder, dataset=dataset_meta())
    images = garments(90, size=8, seed=1).numpy()[:, 0]
    np.savez(tmp_path / "valid.npz", images=images)
    argv = ["calibrate", "--model", str(folder), "--data", f"npz:{tmp_path / 'valid.npz'}", "--no-progress"]
    assert main([*argv, "--cache", ""]) == 0
    exact = read_metadata(folder)["calibration"]
    assert main([*argv, "--cache", "", "--reencode"]) == 0
    mixed = read_metadata(folder)["calibration"]
    assert "re-encoded" in mixed["data"] and "re-encoded" not in exact["data"]
    assert mixed["command"].endswith("--reencode") and mixed["n"] == exact["n"] == 90
    assert mixed["scores"]["nll"]["threshold"] != exact["scores"]["nll"]["threshold"]
