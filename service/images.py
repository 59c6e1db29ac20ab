"""Image I/O for the API: base64 and uploaded bytes in, PNGs out. Pure functions, no model code.

Uploaded images are 8-bit (values 0..255); models take integer levels (B, C, H, W) in
[0, levels-1]. For the usual levels=256 the two are the same; otherwise :func:`to_levels` and
:func:`from_levels` map between them. Channel count C=1 is Pillow mode "L" (grayscale), C=3 is "RGB".
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from models import image_convert
from models.image_convert import ALLOWED_FORMATS, MODES, convert_mode, describe_unsupported, from_levels, to_levels
from service.errors import BadRequest, PayloadTooLarge

__all__ = ["ALLOWED_FORMATS", "MODES", "convert_mode", "from_levels", "to_levels"]
CONVERTIBLE = "send it as grayscale or RGB(A), e.g. a PNG or JPEG"
MODE_NAMES = {
    "L": "grayscale",
    "RGB": "RGB",
    "P": "palette",
    "1": "1-bit",
    "LA": "grayscale+alpha",
    "I;16": "16-bit grayscale",
    "I": "32-bit integer grayscale",
    "F": "floating-point grayscale",
}


def configure_pil(max_pixels: int) -> None:
    """Make Pillow refuse images above ``max_pixels`` (a process-wide Pillow setting).

    Pillow warns between 1x and 2x its limit and raises above 2x; the warning is turned into an
    error here so both paths end in :func:`open_image`'s 413.
    """
    Image.MAX_IMAGE_PIXELS = max_pixels  # JPEGs are opened without it, to be reduced first (open_image)
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


def decode_base64(text: str, index: int) -> bytes:
    """Bytes of a base64 string (a ``data:image/...;base64,`` prefix is allowed)."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadRequest(f"image {index} is not valid base64 ({e}); send the file's bytes base64-encoded") from e
    if not data:
        raise BadRequest(f"image {index} is empty")
    return data


def open_image(data: bytes, index: int, *, max_pixels: int, reduce: bool = False) -> Image.Image:
    """Open image bytes, refusing undecodable data and images over ``max_pixels``; the pixels are
    decoded later, by :func:`fit_to_model`, once the header says the image is worth decoding. With
    ``reduce`` (``resize=true``) a larger JPEG is set to decode at 1/2, 1/4 or 1/8 of its size
    (:func:`models.image_convert.reduce_large_jpeg`), so photos up to 64 times the limit are taken."""
    try:
        im = image_convert.open_file(data)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise PayloadTooLarge(f"image {index} has too many pixels; the limit is {max_pixels} (width x height)") from e
    except UnidentifiedImageError as e:  # Pillow's message names its BytesIO object: say what was sent instead
        what = describe_unsupported(data)
        raise BadRequest(
            f"image {index} could not be decoded as an image ({', '.join(ALLOWED_FORMATS)}): "
            + (f"it is {what}" if what else f"its {len(data)} bytes are in none of these formats")
        ) from e
    except Exception as e:  # a decoder's error on a client's bytes (libavif raises RuntimeError)
        raise BadRequest(f"image {index} could not be decoded as an image ({', '.join(ALLOWED_FORMATS)}): {e}") from e
    w, h = im.size  # from the header; no pixels decoded yet
    if reduce:
        im = image_convert.reduce_large_jpeg(im, max_pixels)
    if im.width * im.height > max_pixels:
        hint = "JPEG photos up to 64 times that are decoded at a reduced scale with resize=true"
        raise PayloadTooLarge(
            f"image {index} is {w}x{h} = {w * h} pixels; the limit is {max_pixels} (GENSERVE_MAX_IMAGE_PIXELS; "
            f"{hint}): send a smaller image"
        )
    return im


def load_pixels(im: Image.Image, index: int) -> None:
    """Decode an opened image's pixels, refusing truncated or corrupt data (400) and a frame larger
    than its header said (413: an ICO's embedded PNG is sized only when it is loaded)."""
    try:
        im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise PayloadTooLarge(f"image {index} holds more pixels than its header says: {e}") from e
    except Exception as e:  # whatever a decoder raises on corrupt bytes (a TIFF's TypeError, an AVIF's RuntimeError)
        raise BadRequest(f"image {index} is truncated or corrupt: {e}") from e


def describe_mode(mode: str) -> str:
    return MODE_NAMES.get(mode, mode)


def fit_to_model(
    im: Image.Image, index: int, *, shape: tuple[int, int, int], model_name: str, resize: bool, fit: str = "pad"
) -> tuple[np.ndarray, bool]:
    """The image as uint8 (C, H, W) for a model of ``shape``; returns (array, converted?).

    Without ``resize`` a different size or mode is refused (422). With it, the image goes through
    :func:`models.image_convert.to_model_array` (EXIF orientation applied, alpha over white, converted
    to the model's mode, sized to its H x W by ``fit``: "pad" keeps the aspect ratio, "stretch" does
    not): the same function the offline evaluation of uploaded files calls.
    """
    c, h, w = shape
    if c not in MODES:
        raise BadRequest(f"model '{model_name}' takes {c}-channel images, which the image API cannot decode")
    mode = MODES[c]
    if (im.size != (w, h) or im.mode != mode) and not resize:  # size and mode from the header alone
        raise BadRequest(
            f"image {index} is {im.height}x{im.width} {describe_mode(im.mode)}; model '{model_name}' "
            f"takes {c}x{h}x{w} {describe_mode(mode)} (send resize=true to convert)"
        )
    load_pixels(im, index)
    if not resize:
        arr = np.asarray(im, dtype=np.uint8)  # (H, W) or (H, W, C): taken exactly as stored
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return np.ascontiguousarray(arr), False
    try:
        return image_convert.to_model_array(im, shape, fit)
    except (OSError, ValueError) as e:  # a mode Pillow cannot convert (a LAB TIFF)
        raise BadRequest(
            f"image {index} is {describe_mode(im.mode)}, which cannot be converted ({e}); {CONVERTIBLE}"
        ) from e


def fit_with_colour(
    im: Image.Image, index: int, *, shape: tuple[int, int, int], model_name: str, tolerance: int, fit: str = "pad"
) -> tuple[np.ndarray, bool, float]:
    """:func:`fit_to_model` with ``resize``, and the fraction of the file's pixels in colour for the
    model's colour check (:func:`models.image_convert.to_model_array_and_colour`: one conversion to
    RGB serves both)."""
    if shape[0] not in MODES:
        raise BadRequest(f"model '{model_name}' takes {shape[0]}-channel images, which the image API cannot decode")
    load_pixels(im, index)
    try:
        return image_convert.to_model_array_and_colour(im, shape, tolerance, fit)
    except (OSError, ValueError) as e:  # a mode Pillow cannot take to RGB (a LAB TIFF)
        raise BadRequest(
            f"image {index} is {describe_mode(im.mode)}, which cannot be converted ({e}); {CONVERTIBLE}"
        ) from e


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of one uint8 image (C, H, W), C = 1 or 3."""
    c = image.shape[0]
    arr = image[0] if c == 1 else image.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def png_grid(images: np.ndarray, *, padding: int = 2) -> bytes:
    """One PNG of uint8 images (N, C, H, W) in a near-square grid, rows filled first, black padding."""
    n, c, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((c, padding + rows * (h + padding), padding + cols * (w + padding)), dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        y0, x0 = padding + r * (h + padding), padding + k * (w + padding)
        grid[:, y0 : y0 + h, x0 : x0 + w] = images[i]
    return encode_png(grid)


def heatmap_png(nll_nats: np.ndarray, *, scale_nats: float) -> bytes:
    """Grayscale PNG of a per-pixel NLL map (H, W) in nats: 0 nats -> 0, ``scale_nats`` or more -> 255, linear."""
    assert nll_nats.ndim == 2, nll_nats.shape
    v = np.clip(np.nan_to_num(nll_nats, nan=scale_nats, posinf=scale_nats) / scale_nats, 0.0, 1.0)
    return encode_png(np.round(v * 255.0).astype(np.uint8)[None])


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
