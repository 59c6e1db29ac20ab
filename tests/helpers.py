"""Shared test constants: the tiny model configs the fixtures save, and their dataset metadata."""

from __future__ import annotations

from typing import Any

TINY_PIXELCNN = dict(
    in_channels=1, height=8, width=8, levels=256, hidden=8, n_blocks=1, first_kernel=3, kernel=3, out_hidden=16
)
TINY_VAE = dict(
    in_channels=1,
    height=8,
    width=8,
    latent_dim=4,
    hidden=8,
    downsample=1,
    res_blocks=1,
    n_mixtures=2,
    iwae_samples=4,
    iwae_chunk=4,
)


def dataset_meta(classes: list[str] | None = None) -> dict[str, Any]:
    return {"spec": "test", "name": "test", "shape": [1, 8, 8], "levels": 256, "classes": classes}
