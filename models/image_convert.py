"""Image files -> model input arrays: the one conversion behind ``/score`` with ``resize=true`` and the
offline evaluation of uploaded files (``genserve eval-ood --suite``). Pure functions of Pillow images,
no service code, so both the service and the tools call the same lines.

What a file goes through, in order (:func:`decode_file`, then :func:`to_model_array`):

0. **Large JPEGs** (over 4 million pixels, or ``GENSERVE_MAX_IMAGE_PIXELS`` if lower: a phone photo
   of 12 or 48 megapixels) are decoded by libjpeg at 1/2, 1/4 or 1/8 of their size, the largest
   within it (:func:`reduce_large_jpeg`); every other image decodes at full size.
1. **EXIF orientation** is applied (``ImageOps.exif_transpose``): a phone photo is judged upright, as
   viewers show it, not as its sensor stored it.
2. **16-bit grayscale** is scaled to 8 bits (the top byte), not clipped; 32-bit integer and
   floating-point pixels by their range (integers up to 255 as 8-bit, up to 65535 as 16-bit; floats
   up to 1 as intensities, up to 255 as 8-bit; beyond: refused, :func:`wide_to_8bit`).
3. **Palettes** are expanded to RGBA first, so palette transparency survives.
4. **Alpha** is composited over white, as browsers and image viewers show a transparent image on a
   page: an icon, logo, sticker or cut-out is judged as it appears, not as an object on Fashion-MNIST's
   black background (the training images are opaque). A grayscale garment cut out of its background
   is therefore judged on white; flatten it onto black to have it judged as a Fashion-MNIST image.
   (Pillow's plain ``convert`` would drop alpha and keep whatever colour transparent pixels store.)
5. **Colour to grayscale** is Pillow's ITU-R 601-2 luma, L = (299 R + 587 G + 114 B) / 1000.
6. **Size**, by ``fit`` (:data:`FITS`). ``"pad"`` (the default): the aspect ratio is kept; the image
   is scaled with Lanczos resampling to fit the model's H x W and centred on a canvas of the median
   colour of its own edge pixels (:func:`letterbox`), as Fashion-MNIST's images were made (longest
   side to 28, centred): a 600x300 banner becomes a 28x14 band on its own background, not a square
   of strokes twice as tall. ``"stretch"``: stretched to H x W with Lanczos, the aspect ratio not
   kept (``resize=true`` before session 18). An image of the model's aspect ratio is the same both
   ways, so the 28x28 files of the test sets are unchanged.

Step 5 discards colour, which a model of grayscale images never saw; :func:`colour_fraction` measures
it on the file as decoded (after steps 1-4), for the colour check of :mod:`models.scoring.colour`.
"""

from __future__ import annotations

import io
import struct
from typing import TypeVar

import numpy as np
from PIL import Image, ImageFile, ImageOps, JpegImagePlugin, UnidentifiedImageError, features

# Formats we decode; anything else is refused rather than handed to a rarely used Pillow plugin. ICO
# (favicons, Windows icons: the largest image in the file) and AVIF (where Pillow's build has libavif,
# as its wheels do since 11.2) are what people upload besides the usual five.
WANTED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "ICO", "AVIF")
MODES = {1: "L", 3: "RGB"}  # channels -> Pillow mode


def _available(formats: tuple[str, ...]) -> tuple[str, ...]:
    Image.init()
    checks = {"WEBP": "webp", "AVIF": "avif"}  # plugins that need a library Pillow may be built without
    return tuple(f for f in formats if f in Image.OPEN and (f not in checks or features.check(checks[f])))


ALLOWED_FORMATS = _available(WANTED_FORMATS)

HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis")


def describe_unsupported(data: bytes) -> str | None:
    """What ``data`` is, if it is a kind of file people send as an image that we do not decode (SVG,
    PDF, HEIC, JPEG XL, Photoshop), with what to send instead; None otherwise. From the first bytes."""
    head = data[:1024]
    if b"<svg" in head.lower():
        return "an SVG drawing (vector graphics): rasterize it to PNG first (e.g. rsvg-convert -w 256 in.svg > out.png)"
    if head.lstrip()[:5] == b"%PDF-":
        return "a PDF document: render its page to PNG first (e.g. pdftoppm -png -r 50 in.pdf page)"
    if head[4:8] == b"ftyp" and any(brand in head[8:40] for brand in HEIF_BRANDS):
        return "a HEIC/HEIF photo (as phones save them): export it as JPEG first"
    if head[:2] == b"\xff\x0a" or head[4:12] == b"JXL \r\n\x87\n":
        return "a JPEG XL image: convert it to PNG or JPEG first"
    if head[:4] == b"8BPS":
        return "a Photoshop document: export it as PNG first"
    return None


Im = TypeVar("Im", bound=Image.Image)
DEFAULT_MAX_PIXELS = 16_000_000  # width x height decoded at most (GENSERVE_MAX_IMAGE_PIXELS): a 5K screenshot
JPEG_REDUCTION = 8  # libjpeg decodes at 1/2, 1/4 or 1/8 of the size, in the DCT domain
JPEG_DECODE_PIXELS = 4_000_000  # larger JPEGs are decoded reduced to at most this (or 1/8 of their size)


def reduce_large_jpeg(im: Im, max_pixels: int) -> Im:
    """A JPEG of more than :data:`JPEG_DECODE_PIXELS` or ``max_pixels`` (a phone or camera photo) set to
    decode at the largest of 1/2, 1/4, 1/8 of its size within both (Pillow's ``draft``: libjpeg
    scales in the DCT domain, so the full-size pixels are never held, and a 12-megapixel photo
    decodes in half the time). Anything else is left as it is; call before the pixels are decoded.
    The model sees 28x28: 4 million pixels are plenty to stretch from."""
    w, h = im.size
    target = min(max_pixels, JPEG_DECODE_PIXELS)
    if w * h <= target or not isinstance(im, JpegImagePlugin.JpegImageFile):  # MPO photos are JPEGs too
        return im
    for scale in (2, 4, JPEG_REDUCTION):
        if (-(-w // scale)) * (-(-h // scale)) <= target or scale == JPEG_REDUCTION:  # libjpeg rounds up
            im.draft(im.mode, (max(1, w // scale), max(1, h // scale)))  # Pillow picks the scale w // size: this one
            break
    return im


JPEG_MAGIC = b"\xff\xd8\xff"


def open_file(data: bytes) -> ImageFile.ImageFile:
    """Open image bytes (one of :data:`ALLOWED_FORMATS`) without decoding the pixels. Every format but
    JPEG goes through ``Image.open`` and so through Pillow's decompression-bomb check
    (``Image.MAX_IMAGE_PIXELS``, which also guards the frames an ICO file reveals only when loaded); a
    JPEG is opened by its own plugin, without that check, so that a large one can first be reduced
    (:func:`reduce_large_jpeg`): the caller checks its size (the service: before decoding)."""
    if data[:3] != JPEG_MAGIC:
        return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    try:
        return JpegImagePlugin.JpegImageFile(io.BytesIO(data))
    except (SyntaxError, IndexError, TypeError, struct.error) as e:  # what Image.open calls unidentified
        raise UnidentifiedImageError(f"cannot identify image file ({e})") from e


def decode_file(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes (one of :data:`ALLOWED_FORMATS`), a large JPEG at a reduced scale as the
    service decodes it (:func:`reduce_large_jpeg`); raises Pillow's errors unchanged."""
    im = reduce_large_jpeg(open_file(data), max_pixels)
    im.load()
    return im


def wide_to_8bit(im: Image.Image) -> Image.Image:
    """A grayscale image of more than 8 bits per pixel as 8-bit "L". 16-bit pixels ("I;16*") keep
    their top byte. 32-bit integer ("I") and floating-point ("F") pixels carry no range of their own,
    so it is read from the values: integers within 0..255 are 8-bit values (what Pillow's own
    ``convert("I")`` of an 8-bit image holds) and within 0..65535 16-bit ones (top byte); floats
    within 0..1 are intensities (the convention of float images), scaled by 255, and within 0..255
    8-bit values (Pillow's ``convert("F")``), rounded. Raises ValueError beyond those ranges or for
    values that are not finite: what they mean is not defined, so nothing is guessed."""
    if im.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8))
    if im.mode == "I":
        a = np.asarray(im, dtype=np.int64)
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise ValueError(f"32-bit integer pixels from {lo} to {hi}, outside 0..65535")
        return Image.fromarray((a if hi <= 255 else a >> 8).astype(np.uint8))
    f = np.asarray(im, dtype=np.float64)
    if f.size and not np.isfinite(f).all():
        raise ValueError(f"{int((~np.isfinite(f)).sum())} floating-point pixels are not finite numbers")
    f_lo, f_hi = (float(f.min()), float(f.max())) if f.size else (0.0, 0.0)
    if f_lo < 0.0 or f_hi > 255.0:
        raise ValueError(f"floating-point pixels from {f_lo:g} to {f_hi:g}, outside 0..1 (or 0..255)")
    return Image.fromarray(np.round(f * 255.0 if f_hi <= 1.0 else f).astype(np.uint8))


def convert_mode(im: Image.Image, mode: str) -> Image.Image:
    """``im`` in Pillow mode ``mode`` ("L" or "RGB"): 16-bit, 32-bit and float pixels scaled
    (:func:`wide_to_8bit`), palettes expanded, alpha over white."""
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        im = wide_to_8bit(im)
    elif im.mode == "P":
        im = im.convert("RGBA")  # keeps palette transparency without Pillow's warning
    if im.mode in ("RGBA", "LA", "PA") or (im.mode in ("RGB", "L") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        page = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(page, rgba).convert("RGB")
    return im if im.mode == mode else im.convert(mode)


FITS = ("pad", "stretch")  # how a file of another aspect ratio is sized (step 6 of the module docstring)


def edge_colour(im: Image.Image) -> int | tuple[int, ...]:
    """The per-channel median of the pixels on the image's four edges (an "L" or "RGB" image): the
    colour of its background, in the image's own mode."""
    w, h, c = im.width, im.height, len(im.getbands())
    strips = [im.crop(box) for box in ((0, 0, w, 1), (0, h - 1, w, h), (0, 0, 1, h), (w - 1, 0, w, h))]
    edges = np.concatenate([np.asarray(s, dtype=np.uint8).reshape(-1, c) for s in strips])  # (2W + 2H, C)
    fill = tuple(int(v) for v in np.round(np.median(edges, axis=0)))  # only the edges are read, not every pixel
    return fill[0] if len(fill) == 1 else fill


def letterbox(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``im`` ("L" or "RGB") scaled with Lanczos to fit within ``size`` = (W, H), its aspect ratio kept
    (each side at least one pixel), centred on a canvas of its :func:`edge_colour`."""
    w, h = size
    scale = min(w / im.width, h / im.height)
    fitted = (min(w, max(1, round(im.width * scale))), min(h, max(1, round(im.height * scale))))
    scaled = im.resize(fitted, Image.Resampling.LANCZOS)
    if fitted == size:
        return scaled
    canvas = Image.new(im.mode, size, edge_colour(im))
    canvas.paste(scaled, ((w - fitted[0]) // 2, (h - fitted[1]) // 2))
    return canvas


def to_model_array(im: Image.Image, shape: tuple[int, int, int], fit: str = "pad") -> tuple[np.ndarray, bool]:
    """The image as uint8 (C, H, W) for a model of ``shape`` = (C, H, W), C in {1, 3}, by steps 1-6 of
    the module docstring, sized by ``fit`` (one of :data:`FITS`); returns (array, whether anything
    was converted). An image already in the model's mode and size, without an EXIF rotation, is taken
    as it is."""
    if fit not in FITS:
        raise ValueError(f"fit must be one of {', '.join(FITS)}, got {fit!r}")
    c, h, w = shape
    mode = MODES[c]
    converted = False
    if _rotated(im):
        im = ImageOps.exif_transpose(im)
        converted = True
    if im.mode != mode or "transparency" in im.info:
        im = convert_mode(im, mode)
        converted = True
    if im.size != (w, h):
        im = letterbox(im, (w, h)) if fit == "pad" else im.resize((w, h), Image.Resampling.LANCZOS)
        converted = True
    arr = np.asarray(im, dtype=np.uint8)  # (H, W) or (H, W, C)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    assert arr.shape == shape, (arr.shape, shape)
    return np.ascontiguousarray(arr), converted


VIA_RGB = ("RGB", "RGBA", "P", "PA")  # modes whose conversion to "L" goes through convert_mode(im, "RGB")


def to_model_array_and_colour(
    im: Image.Image, shape: tuple[int, int, int], tolerance: int, fit: str = "pad"
) -> tuple[np.ndarray, bool, float]:
    """:func:`to_model_array` and :func:`colour_fraction` of one image, the same values as calling both,
    for less: for a grayscale model the conversion of an RGB(A) or palette image passes through the
    RGB image that the colour is measured on, so it is made once (a palette screenshot's alpha
    compositing is most of its decoding time)."""
    if shape[0] != 1 or im.mode not in VIA_RGB:
        return (*to_model_array(im, shape, fit), colour_fraction(im, tolerance))
    if _rotated(im):  # as to_model_array does first; the colour does not depend on it
        im = ImageOps.exif_transpose(im)
    rgb = convert_mode(im, "RGB")
    arr, _ = to_model_array(rgb, shape, fit)  # rgb.convert("L"), then the resize: to_model_array's own steps
    return arr, True, _chroma_fraction(rgb, tolerance)


def _chroma_fraction(rgb: Image.Image, tolerance: int) -> float:
    """The fraction of an RGB image's pixels with max(R, G, B) - min(R, G, B) > tolerance."""
    r, g, b = (np.asarray(band, dtype=np.uint8) for band in rgb.split())
    chroma = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)  # uint8: max >= min
    return float(np.count_nonzero(chroma > tolerance)) / chroma.size if chroma.size else 0.0


def _rotated(im: Image.Image) -> bool:
    """True if the image carries an EXIF orientation other than 'as stored' (1)."""
    try:
        return int(im.getexif().get(0x0112, 1)) not in (0, 1)
    except Exception:  # a malformed EXIF block: Pillow's transpose ignores it too
        return False


COLOURLESS_MODES = ("1", "L", "LA", "La", "I", "F")  # and every "I;16*": no colour channels to measure


def colour_fraction(im: Image.Image, tolerance: int) -> float:
    """The fraction (0..1) of the image's pixels whose chroma, max(R, G, B) - min(R, G, B) in 8-bit
    levels, exceeds ``tolerance`` (0..254), measured at the file's own resolution after palettes are
    expanded and alpha is composited over white (so a transparent pixel counts as the white page the
    model sees; a colour at opacity a keeps a times its chroma, over white as over black). 0.0 for
    images without colour channels (grayscale, 16-bit, bilevel)."""
    if not 0 <= tolerance < 255:
        raise ValueError(f"colour tolerance must lie in 0..254 levels, got {tolerance}")
    if im.mode in COLOURLESS_MODES or im.mode.startswith("I;16"):
        return 0.0
    return _chroma_fraction(convert_mode(im, "RGB"), tolerance)


def from_levels(images: np.ndarray, levels: int) -> np.ndarray:
    """Integer levels 0..levels-1 -> 8-bit values 0..255 (identity for levels=256)."""
    if levels == 256:
        return images.astype(np.uint8)
    return np.round(images.astype(np.float64) * 255.0 / (levels - 1)).clip(0, 255).astype(np.uint8)


def to_levels(images: np.ndarray, levels: int) -> np.ndarray:
    """8-bit values 0..255 -> integer levels 0..levels-1 (identity for levels=256)."""
    if levels == 256:
        return images
    return (images.astype(np.int64) * levels // 256).astype(np.uint8 if levels <= 256 else np.int64)


def file_to_levels(
    data: bytes, shape: tuple[int, int, int], levels: int, *, max_pixels: int = DEFAULT_MAX_PIXELS, fit: str = "pad"
) -> np.ndarray:
    """One uploaded file's bytes -> model levels (C, H, W): what ``/score`` with ``resize=true`` (and
    ``fit``) feeds the model (decoding, :func:`to_model_array`, :func:`to_levels`) under
    ``GENSERVE_MAX_IMAGE_PIXELS`` = ``max_pixels``."""
    arr, _ = to_model_array(decode_file(data, max_pixels), shape, fit)
    return to_levels(arr, levels)


def file_colour_fraction(data: bytes, tolerance: int) -> float:
    """:func:`colour_fraction` of one uploaded file's bytes, as ``/score`` measures it."""
    return colour_fraction(decode_file(data), tolerance)
