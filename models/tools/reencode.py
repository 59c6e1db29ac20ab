"""Calibration images re-encoded the way a pipeline re-encodes what it uploads (``genserve calibrate
--reencode``): JPEG at a range of qualities, upscaling, both. A gate calibrated on exact 8-bit images
refuses most in-distribution images that arrive as JPEGs or upscaled (docs/ood.md, "A limit");
calibrated on the same images re-encoded, it takes them as in-distribution.

Each image becomes the bytes of a file, decoded back through ``/score``'s own conversion with
``resize=true`` (:func:`models.image_convert.file_to_levels`), so the calibration sees what the
service will see.
"""

from __future__ import annotations

import io
import random

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from models.image_convert import MODES, file_to_levels, from_levels

WAYS = ("exact", "jpeg", "upscaled")  # image i is re-encoded the way WAYS[i % 3]
JPEG_QUALITY = (70, 95)  # a JPEG's quality, drawn uniformly from this range
UPSCALE = (2, 4)  # an upscaled image's factor, drawn from this range; JPEG'd after it half the time


def reencode_file(image: np.ndarray, way: str, rng: random.Random) -> tuple[bytes, str]:
    """One image uint8 (C, H, W) as the bytes of a file re-encoded ``way`` (one of :data:`WAYS`),
    with the random quality and scale drawn from ``rng``; returns (bytes, file suffix)."""
    c = image.shape[0]
    im = Image.fromarray(image[0] if c == 1 else image.transpose(1, 2, 0), MODES[c])
    if way == "upscaled":
        f = rng.randint(*UPSCALE)
        im = im.resize((im.width * f, im.height * f), Image.Resampling.BICUBIC)
    jpeg = way == "jpeg" or (way == "upscaled" and rng.random() < 0.5)
    buf = io.BytesIO()
    if jpeg:
        im.save(buf, format="JPEG", quality=rng.randint(*JPEG_QUALITY))
    else:
        im.save(buf, format="PNG")
    return buf.getvalue(), ".jpg" if jpeg else ".png"


def reencode(images: Tensor, levels: int, *, seed: int = 0) -> Tensor:
    """Integer levels (N, C, H, W) -> the same images re-encoded (a third each exact, JPEG'd, upscaled:
    :func:`reencode_file`) and converted back as ``/score`` converts an upload, as levels."""
    rng = random.Random(seed)
    shape = tuple(images.shape[1:])
    if len(shape) != 3 or shape[0] not in MODES:
        raise ValueError(f"re-encoding takes 1- or 3-channel images (N, C, H, W), got {tuple(images.shape)}")
    eight = from_levels(images.numpy(), levels)
    out = np.empty(images.shape, dtype=np.int64)
    for i, a in enumerate(eight):
        data, _ = reencode_file(a, WAYS[i % len(WAYS)], rng)
        out[i] = file_to_levels(data, shape, levels)
    return torch.from_numpy(out).to(images.dtype)
