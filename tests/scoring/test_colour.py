"""The colour check of uploads for models of grayscale images: the fraction of coloured pixels
measured on the decoded file (models/image_convert.py) and the check's rule and JSON (models/scoring/colour.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from models.image_convert import colour_fraction, file_colour_fraction
from models.scoring.colour import ColourCheck, colour_check_for


def rgb(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array.astype(np.uint8), mode="RGB" if array.shape[-1] == 3 else "RGBA")


def test_gray_pixels_stored_as_rgb_have_no_colour():
    g = np.random.default_rng(0).integers(0, 256, size=(20, 30), dtype=np.uint8)
    assert colour_fraction(rgb(np.stack([g, g, g], axis=-1)), 0) == 0.0
    assert colour_fraction(Image.fromarray(g), 0) == 0.0  # mode L: no colour channels at all
    assert colour_fraction(Image.fromarray(g).convert("LA"), 0) == 0.0
    assert colour_fraction(Image.fromarray(g).convert("1"), 0) == 0.0


def test_fraction_counts_pixels_whose_chroma_exceeds_the_tolerance():
    a = np.full((10, 10, 3), 100, np.uint8)
    a[0, :4] = (140, 100, 100)  # chroma 40
    a[1, :3] = (100, 133, 100)  # chroma 33
    a[2, :2] = (100, 100, 132)  # chroma 32: at the tolerance, still gray
    im = rgb(a)
    assert colour_fraction(im, 32) == pytest.approx(7 / 100)
    assert colour_fraction(im, 35) == pytest.approx(4 / 100)
    assert colour_fraction(im, 31) == pytest.approx(9 / 100)
    assert colour_fraction(im, 40) == 0.0


def test_transparent_colour_is_background_and_half_transparent_colour_counts():
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., 0] = 255  # red everywhere
    a[0, :, 3] = 255  # row 0 opaque red
    a[1, :, 3] = 128  # row 1 half transparent: (128, 0, 0) over black, chroma 128
    a[2, :, 3] = 20  # row 2 nearly transparent: (20, 0, 0), chroma 20
    # row 3 fully transparent: black
    assert colour_fraction(rgb(a), 32) == pytest.approx(8 / 16)


def test_palette_images_are_judged_by_their_colours():
    gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).convert("P")
    assert colour_fraction(gray, 0) == 0.0
    coloured = rgb(np.stack([np.full((8, 8), 200), np.zeros((8, 8)), np.zeros((8, 8))], axis=-1)).convert("P")
    assert colour_fraction(coloured, 32) == 1.0


def test_jpeg_noise_of_a_gray_picture_stays_under_the_default_tolerance():
    g = np.random.default_rng(1).integers(0, 256, size=(64, 64), dtype=np.uint8)
    buf = io.BytesIO()
    rgb(np.stack([g, g, g], axis=-1)).save(buf, format="JPEG", quality=60)
    assert file_colour_fraction(buf.getvalue(), ColourCheck().tolerance) == 0.0


def test_bad_tolerance_is_refused():
    with pytest.raises(ValueError, match="tolerance"):
        colour_fraction(rgb(np.zeros((2, 2, 3))), 255)
    with pytest.raises(ValueError, match="tolerance"):
        ColourCheck(tolerance=-1)
    with pytest.raises(ValueError, match="max_fraction"):
        ColourCheck(max_fraction=1.0)


def test_the_check_crosses_only_above_its_fraction_and_round_trips_through_json():
    check = ColourCheck(tolerance=20, max_fraction=0.05)
    assert not check.crossed(0.05) and check.crossed(0.0501) and not check.crossed(None)
    assert check.result(0.5) == {"fraction": 0.5, "tolerance": 20, "max_fraction": 0.05, "crossed": True}
    meta = {"calibration": {"colour": check.to_json()}}
    assert colour_check_for(meta) == check
    assert colour_check_for({"calibration": {"scores": {}}}) is None and colour_check_for({}) is None
