"""Shared fixtures: tiny checkpoints on disk and settings for in-process service apps."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from models.checkpoint import save_checkpoint
from models.pixelcnn import PixelCNN, PixelCNNConfig
from models.vae import VAE, VAEConfig
from tests.helpers import TINY_PIXELCNN, TINY_VAE, dataset_meta


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint folder with three tiny models: pixelcnn, pixelcnn-cond (classes a, b, c) and vae."""
    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    save_checkpoint(
        PixelCNN(PixelCNNConfig(**TINY_PIXELCNN)),
        root / "pixelcnn",
        dataset=dataset_meta(),
        metrics={"test_bits_per_dim": 7.9},
    )
    save_checkpoint(
        PixelCNN(PixelCNNConfig(**TINY_PIXELCNN, n_classes=3)),
        root / "pixelcnn-cond",
        dataset=dataset_meta(["a", "b", "c"]),
    )
    save_checkpoint(VAE(VAEConfig(**TINY_VAE)), root / "vae", dataset=dataset_meta())
    return root


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def make_settings(model_dir: Path) -> Callable[..., Any]:
    from service.settings import Settings

    def make(**overrides: Any) -> Settings:
        # batch_sweep off: tests that count passes need max_batch_size as the cap, not a timing's choice;
        # model_process off: tests reach into a worker's model on its thread (test_model_process.py tests the other);
        # one worker per device: tests that count passes send to one (test_settings.py and test_serving.py test auto)
        base = {
            "model_dir": model_dir, "max_batch_wait_ms": 0.0, "batch_sweep": False, "model_process": "false",
            "workers_per_device": "1",
        }  # fmt: skip
        return Settings(**{**base, **overrides})

    return make
