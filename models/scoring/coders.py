"""Lossless code lengths L(x), for the complexity scores (:mod:`models.scoring.scores`).

L(x) is the shorter of the lossless WebP bitstream and the raw image (what incompressible noise
costs), plus one bit saying which; PNG's length is kept for comparison (bench/complexity_coders.py).
"""

from __future__ import annotations

import io
import math
import struct
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def png_code_bits(x: Tensor) -> Tensor:
    """Bits of each image's PNG stream at maximum compression (zlib level 9, Pillow's filter choice):
    the IDAT payload, without the file's constant signature and chunk framing, which a decoder that
    knows the image shape does not need. x (B, C, H, W) integers, C in {1, 3}, values < 256 ->
    (B,) float64."""
    files = _encode_each(x, format="PNG", optimize=True, compress_level=9)
    return torch.tensor([8.0 * _idat_bytes(f) for f in files], dtype=torch.float64)


def _encode_each(x: Tensor, **save: Any) -> list[bytes]:
    """Each image of x (B, C, H, W) integers < 256, C in {1, 3}, saved by Pillow with ``save``."""
    assert x.dim() == 4 and x.shape[1] in (1, 3), x.shape
    files = []
    for im in x.detach().to("cpu", torch.uint8).numpy():
        buf = io.BytesIO()
        Image.fromarray(im[0] if im.shape[0] == 1 else np.ascontiguousarray(im.transpose(1, 2, 0))).save(buf, **save)
        files.append(buf.getvalue())
    return files


def _idat_bytes(png: bytes) -> int:
    """Total length of a PNG file's IDAT chunks (its compressed image data)."""
    pos, total = 8, 0  # after the 8-byte signature: chunks of length (4), type (4), data, crc (4)
    while pos + 8 <= len(png):
        length = struct.unpack(">I", png[pos : pos + 4])[0]
        if png[pos + 4 : pos + 8] == b"IDAT":
            total += length
        pos += 12 + length
    return total


def webp_code_bits(x: Tensor) -> Tensor:
    """Bits of each image as lossless WebP (quality 100, method 4: libwebp's default effort): the VP8L
    bitstream, without the file's constant RIFF framing. x (B, C, H, W) integers, C in {1, 3},
    values < 256 -> (B,) float64."""
    bits = []
    for data in _encode_each(x, format="WEBP", lossless=True, quality=100, method=4):
        # RIFF header (12 bytes), then one chunk: "VP8L", its length (4 bytes, little-endian), the bitstream.
        vp8l = struct.unpack("<I", data[16:20])[0] if data[12:16] == b"VP8L" else len(data)
        bits.append(8.0 * vp8l)
    return torch.tensor(bits, dtype=torch.float64)


CODER = "webp-lossless-q100-m4|raw"  # what code_length_bits is; calibrations record it


def code_length_bits(x: Tensor, *, levels: int) -> Tensor:
    """L(x) of the complexity score: the shorter of the lossless WebP bitstream and the raw image
    (D log2(levels) bits, what incompressible noise costs), plus one bit saying which: a lossless code
    length in bits, (B,) float64, for x (B, C, H, W) integers in [0, levels-1].

    WebP's lossless coder (spatial prediction, colour cache, entropy-coded residuals) codes these
    images shorter than PNG and separates better (bench/complexity_coders.py, docs/ood.md); the raw
    fallback keeps noise, which every coder expands, from looking less surprising than it is."""
    raw = x[0].numel() * math.log2(levels)
    return 1.0 + torch.clamp(webp_code_bits(x), max=raw)


def coder_version() -> str:
    """The libwebp that :func:`webp_code_bits` ran (recorded with a calibration)."""
    from PIL import features

    return f"libwebp {features.version('webp')}, Pillow {Image.__version__}"
