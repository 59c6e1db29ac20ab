"""The pure helpers of the service: image decoding and encoding, calibration percentiles."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from models.scoring.calibration import Calibration, calibration_for, default_score_type, percentile
from service import images
from service.errors import BadRequest, PayloadTooLarge
from tests.service.helpers import png_bytes


def test_decode_base64_accepts_data_urls():
    raw = png_bytes(np.zeros((2, 2), np.uint8))
    text = "data:image/png;base64," + base64.b64encode(raw).decode()
    assert images.decode_base64(text, 0) == raw
    with pytest.raises(BadRequest, match="image 3 is not valid base64"):
        images.decode_base64("%%%", 3)


def test_open_image_refuses_oversized_images_before_decoding(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # Pillow's own check off: ours must catch it
    big = png_bytes(np.zeros((50, 50), np.uint8))
    with pytest.raises(PayloadTooLarge, match="image 0 is 50x50 = 2500 pixels; the limit is 1000"):
        images.open_image(big, 0, max_pixels=1000)


def test_a_wrong_size_is_refused_from_the_header_and_a_truncated_image_when_decoded(monkeypatch):
    flat = images.open_image(png_bytes(np.zeros((1500, 1500), np.uint8)), 0, max_pixels=10**7)
    decoded: list[int] = []
    load_pixels = images.load_pixels
    monkeypatch.setattr(images, "load_pixels", lambda im, i: (decoded.append(i), load_pixels(im, i)))
    with pytest.raises(BadRequest, match=r"image 0 is 1500x1500 grayscale.*send resize=true"):
        images.fit_to_model(flat, 0, shape=(1, 28, 28), model_name="m", resize=False)
    assert decoded == []  # the 2.25 million pixels were never decoded
    truncated = images.open_image(png_bytes(np.arange(64, dtype=np.uint8).reshape(8, 8))[:-30], 1, max_pixels=100)
    with pytest.raises(BadRequest, match="image 1 is truncated or corrupt"):
        images.fit_to_model(truncated, 1, shape=(1, 8, 8), model_name="m", resize=False)


def test_fit_to_model_converts_modes_and_sizes():
    rgba = Image.fromarray(np.full((16, 12, 4), 255, np.uint8))
    arr, converted = images.fit_to_model(rgba, 0, shape=(1, 8, 8), model_name="m", resize=True)
    assert converted and arr.shape == (1, 8, 8) and arr.dtype == np.uint8 and (arr == 255).all()
    gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8))
    arr, converted = images.fit_to_model(gray, 0, shape=(3, 8, 8), model_name="m", resize=True)
    assert converted and arr.shape == (3, 8, 8) and (arr[0] == arr[2]).all()
    deep = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    arr, _ = images.fit_to_model(deep, 0, shape=(1, 8, 8), model_name="m", resize=True)
    assert (arr == 255).all()  # 16-bit values are scaled, not clipped
    palette = Image.fromarray(np.zeros((8, 8), np.uint8)).convert("P")
    palette.info["transparency"] = 0
    arr, _ = images.fit_to_model(palette, 0, shape=(1, 8, 8), model_name="m", resize=True)
    assert arr.shape == (1, 8, 8)
    with pytest.raises(BadRequest, match=r"image 2 is 16x12 RGBA; model 'm' takes 1x8x8 grayscale \(send resize"):
        images.fit_to_model(rgba, 2, shape=(1, 8, 8), model_name="m", resize=False)


def test_a_mode_pillow_cannot_convert_is_a_clear_422_with_and_without_the_colour_check():
    """A LAB TIFF decodes but Pillow cannot take it to RGB or grayscale: refused, never a 500."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).convert("LAB").save(buf, format="TIFF")
    lab = images.open_image(buf.getvalue(), 3, max_pixels=100)
    with pytest.raises(BadRequest, match=r"image 3 is LAB, which cannot be converted .*send it as grayscale or RGB"):
        images.fit_to_model(lab, 3, shape=(1, 8, 8), model_name="m", resize=True)
    lab = images.open_image(buf.getvalue(), 3, max_pixels=100)
    with pytest.raises(BadRequest, match=r"image 3 is LAB, which cannot be converted"):
        images.fit_with_colour(lab, 3, shape=(1, 8, 8), model_name="m", tolerance=32)


def test_levels_round_trip():
    x = np.arange(256, dtype=np.uint8)
    assert images.to_levels(x, 256) is x
    q = images.to_levels(x, 16)
    assert q.min() == 0 and q.max() == 15
    assert images.from_levels(q, 16).max() == 255 and images.from_levels(np.zeros(1, np.uint8), 16)[0] == 0


def test_png_grid_layout():
    tiles = np.stack([np.full((1, 4, 4), 10 * (i + 1), np.uint8) for i in range(5)])
    im = Image.open(io.BytesIO(images.png_grid(tiles, padding=1)))
    assert im.size == (1 + 3 * 5, 1 + 2 * 5) and im.mode == "L"  # 3 columns, 2 rows
    a = np.asarray(im)
    assert a[1, 1] == 10 and a[1, 6] == 20 and a[6, 1] == 40 and a[6, 11] == 0  # the sixth cell is empty
    rgb = images.png_grid(np.zeros((2, 3, 4, 4), np.uint8))
    assert Image.open(io.BytesIO(rgb)).mode == "RGB"


def test_heatmap_scale():
    nll = np.array([[0.0, 1.0], [2.0, 100.0]])
    im = Image.open(io.BytesIO(images.heatmap_png(nll, scale_nats=2.0)))
    assert np.asarray(im).tolist() == [[0, 128], [255, 255]]


def test_percentile_among_quantiles():
    q = tuple(float(i) for i in range(101))  # q_k = k
    assert percentile(-1.0, q) == 0.0 and percentile(200.0, q) == 100.0
    assert percentile(42.5, q) == pytest.approx(42.5)
    coarse = (0.0, 10.0, 20.0)  # q_0, q_50, q_100
    assert percentile(5.0, coarse) == pytest.approx(25.0)
    assert percentile(10.0, (0.0, 10.0, 10.0, 30.0)) == pytest.approx(200 / 3)  # ties: the highest rank


def test_calibration_lookup():
    meta = {"calibration": {"default_score": "nll", "scores": {"nll": {"threshold": 5.0, "quantiles": [3, 1, 2]}}}}
    cal = calibration_for(meta, "nll")
    assert cal == Calibration(threshold=5.0, quantiles=(1.0, 2.0, 3.0))
    assert cal.is_outlier(5.5) is True and cal.is_outlier(5.0) is False
    assert calibration_for(meta, "other") == Calibration() and Calibration().is_outlier(9.0) is None
    assert default_score_type(meta) == "nll"
    assert default_score_type({"calibration": None}) == "complexity_guarded"  # uncalibrated: the recommended score


def _saved(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_icons_and_avif_photos_decode_as_the_same_picture():
    """Favicons (ICO, the largest size in the file) and AVIF photos are what people upload besides
    PNG and JPEG: both decode, and a lossless ICO gives exactly the PNG's array."""
    rng = np.random.default_rng(3)
    rgba = np.concatenate([rng.integers(0, 256, (48, 48, 3), np.uint8), np.full((48, 48, 1), 255, np.uint8)], -1)
    icon = Image.fromarray(rgba, "RGBA")
    ico = _saved(icon, "ICO", sizes=[(16, 16), (48, 48)])
    opened = images.open_image(ico, 0, max_pixels=10**6)
    assert opened.format == "ICO" and opened.size == (48, 48)
    from_ico, _ = images.fit_to_model(opened, 0, shape=(1, 8, 8), model_name="m", resize=True)
    png = images.open_image(_saved(icon, "PNG"), 0, max_pixels=10**6)
    from_png, _ = images.fit_to_model(png, 0, shape=(1, 8, 8), model_name="m", resize=True)
    assert (from_ico == from_png).all()
    if "AVIF" not in images.ALLOWED_FORMATS:
        pytest.skip("this Pillow is built without libavif")
    avif = images.open_image(_saved(icon.convert("RGB"), "AVIF", quality=90), 1, max_pixels=10**6)
    arr, _ = images.fit_to_model(avif, 1, shape=(1, 8, 8), model_name="m", resize=True)
    assert np.abs(arr.astype(int) - from_png.astype(int)).mean() < 8  # lossy, but the same picture


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="8"/>', "it is an SVG drawing"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", "it is a PDF document: render its page to PNG"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "it is a HEIC/HEIF photo"),
        (b"\xff\x0a\xfa\x7f", "it is a JPEG XL image"),
        (b"8BPS\x00\x01", "it is a Photoshop document"),
        (b"these bytes are no image", "its 24 bytes are in none of these formats"),
    ],
)
def test_files_we_do_not_decode_are_named_with_what_to_send(data: bytes, what: str):
    with pytest.raises(BadRequest, match=r"image 2 could not be decoded as an image \(PNG, JPEG.*\): " + what):
        images.open_image(data, 2, max_pixels=10**6)


def test_an_icon_frame_larger_than_its_directory_says_is_refused_before_it_is_decoded(monkeypatch):
    """An ICO's directory gives each frame's size, but the embedded PNG has its own header: one whose
    directory entry says 16x16 over a 64x64 PNG meets Pillow's check (Image.MAX_IMAGE_PIXELS, which
    JPEGs alone skip) when the frame is opened: a 413, not a decoding of whatever size it claims."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the service sets it to GENSERVE_MAX_IMAGE_PIXELS
    ico = bytearray(_saved(Image.fromarray(np.zeros((64, 64, 4), np.uint8), "RGBA"), "ICO", sizes=[(64, 64)]))
    assert ico[6:8] == bytes([64, 64])  # the first directory entry's width and height
    ico[6:8] = bytes([16, 16])
    with pytest.raises(PayloadTooLarge, match="image 4 has too many pixels; the limit is 1000"):
        images.open_image(bytes(ico), 4, max_pixels=1000, reduce=True)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10**6)
    with pytest.warns(UserWarning, match="Image was not the expected size"):  # Pillow's, logged in the service
        im = images.open_image(bytes(ico), 4, max_pixels=10**6, reduce=True)
        arr, _ = images.fit_to_model(im, 4, shape=(1, 8, 8), model_name="m", resize=True)
    assert arr.shape == (1, 8, 8)  # within the limit the icon is taken, at the frame's real size


def test_a_large_jpeg_is_opened_without_decoding_and_reduced_only_with_resize():
    big = _saved(Image.fromarray(np.zeros((200, 300, 3), np.uint8)), "JPEG")  # 60,000 pixels
    im = images.open_image(big, 0, max_pixels=1000, reduce=True)
    assert im.size == (38, 25)  # 1/8 of 300x200, rounded up: the first that fits 1,000
    with pytest.raises(PayloadTooLarge, match=r"image 0 is 300x200 = 60000 pixels; the limit is 1000"):
        images.open_image(big, 0, max_pixels=1000, reduce=False)
    with pytest.raises(PayloadTooLarge, match=r"image 0 is 300x200 = 60000 pixels; the limit is 500"):
        images.open_image(big, 0, max_pixels=500, reduce=True)  # even 1/8 (950 pixels) is over
    with pytest.raises(BadRequest, match="image 1 could not be decoded as an image"):
        images.open_image(b"\xff\xd8\xff" + b"\x00" * 40, 1, max_pixels=1000)  # a JPEG's magic and nothing else


def test_corrupt_files_of_every_format_are_a_4xx_never_an_unexpected_error():
    """Seeded mutations of small files of every decoded format through open, decode and conversion:
    only the service's own 4xx errors come out (a corrupt TIFF raised TypeError in Pillow, a corrupt
    AVIF RuntimeError in libavif: both were 500s)."""
    import random
    import warnings

    from service.errors import ServiceError

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (30, 40, 4), dtype=np.uint8)
    seeds = [_saved(Image.fromarray(pixels, "RGBA"), f) for f in ("PNG", "ICO", "WEBP")]
    seeds += [_saved(Image.fromarray(pixels[..., :3]), f) for f in ("JPEG", "TIFF", "BMP", "PPM", "GIF")]
    if "AVIF" in images.ALLOWED_FORMATS:
        seeds.append(_saved(Image.fromarray(pixels[..., :3]), "AVIF"))
    r = random.Random(0)
    outcomes: set[str] = set()
    for _ in range(1500):
        data = bytearray(r.choice(seeds))
        for _ in range(r.randint(1, 8)):
            data[r.randrange(len(data))] = r.randrange(256)
        if r.random() < 0.3:
            data = data[: r.randrange(1, len(data))]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Pillow's warnings about odd files, not errors
                im = images.open_image(bytes(data), 0, max_pixels=10**6, reduce=True)
                images.fit_with_colour(im, 0, shape=(1, 8, 8), model_name="m", tolerance=32)
            outcomes.add("decoded")
        except ServiceError as e:
            outcomes.add(type(e).__name__)
    assert outcomes >= {"decoded", "BadRequest"}


def _tiff(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="TIFF")
    return buf.getvalue()


def test_wide_grayscale_files_convert_by_their_range_and_out_of_range_ones_are_a_clear_422():
    """32-bit integer and float pixels carry no range: 16-bit values saved as 32-bit integers read as
    16-bit (they were clipped to white), floats in 0..1 are scaled by 255 (they were clipped to black),
    and Pillow's own 8-bit conversions to "I" and "F" (values 0..255) convert back exactly; values
    whose meaning is not defined are refused with a 422."""
    ramp = np.linspace(0, 65535, 64).reshape(8, 8).astype(np.uint16)
    eight = np.arange(0, 256, 4, dtype=np.uint8).reshape(8, 8)
    unit = np.linspace(0.0, 1.0, 64).reshape(8, 8).astype(np.float32)
    cases = (
        (ramp, (ramp >> 8).astype(np.uint8)),
        (ramp.astype(np.int32), (ramp >> 8).astype(np.uint8)),
        (unit, np.round(unit.astype(np.float64) * 255).astype(np.uint8)),
        (np.asarray(Image.fromarray(eight).convert("I")), eight),
        (np.asarray(Image.fromarray(eight).convert("F")), eight),
    )
    for a, want in cases:
        im = images.open_image(_tiff(a), 0, max_pixels=100)
        arr, converted = images.fit_to_model(im, 0, shape=(1, 8, 8), model_name="m", resize=True)
        assert converted and np.array_equal(arr[0], want), a.dtype
        im = images.open_image(_tiff(a), 0, max_pixels=100)
        arr, _, colour = images.fit_with_colour(im, 0, shape=(1, 8, 8), model_name="m", tolerance=32)
        assert colour == 0.0 and np.array_equal(arr[0], want)
    for a, said in (
        (unit * 300, r"floating-point grayscale, which cannot be converted \(floating-point pixels from 0 to 300"),
        (np.full((8, 8), np.nan, np.float32), "floating-point grayscale, which cannot be converted"),
        (np.full((8, 8), 70000, np.int32), r"32-bit integer grayscale, which cannot be converted .*outside 0\.\.65535"),
    ):
        im = images.open_image(_tiff(a), 4, max_pixels=100)
        with pytest.raises(BadRequest, match=r"image 4 is " + said):
            images.fit_to_model(im, 4, shape=(1, 8, 8), model_name="m", resize=True)
