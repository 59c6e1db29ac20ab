"""The real-upload suite: its files go through the service's conversion, byte for byte."""

from __future__ import annotations

import io
import itertools
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from models.image_convert import file_colour_fraction, file_to_levels
from models.scoring.colour import ColourCheck
from models.scoring.extent import ExtentCheck, extents
from models.tools.ood_eval import load_eval_set, suite_specs
from models.tools.upload_suite import KINDS
from service.uploads import decode_all

SUITE = Path(__file__).resolve().parents[2] / "data" / "upload-suite"


def kind_files(n: int) -> list[Path]:
    return [p for kind in KINDS for p in sorted((SUITE / kind).iterdir())[:n]]


def test_the_suite_has_every_kind_with_its_sources():
    assert [s.rpartition("/")[2] for s in suite_specs(SUITE)] == sorted(KINDS)
    sources = (SUITE / "SOURCES.md").read_text()
    assert all(f"**{k}**" in sources for k in KINDS)


@pytest.mark.parametrize("fit", ["pad", "stretch"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 8, 8)])
def test_the_suite_conversion_is_the_services(shape, fit):
    check = ColourCheck() if shape[0] == 1 else None  # what a calibrated model of grayscale images has
    entry = SimpleNamespace(shape=shape, name="m", levels=256, colour_check=check, extent_check=ExtentCheck(26))
    files = kind_files(2)
    served = decode_all([p.read_bytes() for p in files], entry, resize=True, max_pixels=10**8, fit=fit)  # type: ignore[arg-type]
    offline = np.stack([file_to_levels(p.read_bytes(), shape, 256, fit=fit) for p in files])
    np.testing.assert_array_equal(served.x, offline)
    assert served.extent == extents(offline, 256).tolist()  # what eval-ood's extent check reads
    assert all(served.converted)
    if check is None:
        assert served.colour == [None] * len(files)
    else:  # the colour eval-ood measures is the colour /score measures
        data = load_eval_set(f"files:{SUITE / 'emoji'}", shape=shape, levels=256, colour_tolerance=check.tolerance)
        assert served.colour == [file_colour_fraction(p.read_bytes(), check.tolerance) for p in files]
        assert data.colour is not None and data.colour[0] == file_colour_fraction(
            sorted((SUITE / "emoji").iterdir())[0].read_bytes(), check.tolerance
        )
        assert 0 < sum(f > check.max_fraction for f in served.colour) < len(files)  # some kinds in colour, some not


def test_converting_and_measuring_colour_at_once_equals_doing_each_on_every_suite_file():
    """The service's shared conversion (one RGB image for both) against the two separate functions, on
    every file of the suite and on the modes a file can hold."""
    from models.image_convert import colour_fraction, decode_file, to_model_array, to_model_array_and_colour

    ims = [decode_file(p.read_bytes()) for kind in KINDS for p in sorted((SUITE / kind).iterdir())]
    base = Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(9, 13, 4), dtype=np.uint8), mode="RGBA")
    ims += [base.convert(m) for m in ("RGB", "RGBA", "P", "PA", "L", "LA", "CMYK", "YCbCr", "I", "F", "1")]
    seen = set()
    for im, fit in itertools.product(ims, ("pad", "stretch")):
        seen.add(im.mode)
        arr, converted, fraction = to_model_array_and_colour(im, (1, 28, 28), 32, fit)
        want, want_converted = to_model_array(im, (1, 28, 28), fit)
        np.testing.assert_array_equal(arr, want)
        assert converted == want_converted and fraction == colour_fraction(im, 32), im.mode
    assert {"RGB", "RGBA", "P", "L"} <= seen


def test_eval_sets_of_files_decode_each_file_as_the_service():
    folder = SUITE / "emoji"
    data = load_eval_set(f"files:{folder}", shape=(1, 28, 28), levels=256)
    first = sorted(folder.iterdir())[0]
    assert data.images.shape[1:] == (1, 28, 28) and data.images.dtype == torch.uint8
    np.testing.assert_array_equal(data.images[0].numpy(), file_to_levels(first.read_bytes(), (1, 28, 28), 256))
    docs = SUITE / "documents"  # pages and banners: not square, so the two fits differ
    pad = load_eval_set(f"files:{docs}", shape=(1, 28, 28), levels=256)
    stretch = load_eval_set(f"files:{docs}", shape=(1, 28, 28), levels=256, fit="stretch")
    wide = sorted(docs.iterdir())[0]
    want = file_to_levels(wide.read_bytes(), (1, 28, 28), 256, fit="stretch")
    np.testing.assert_array_equal(stretch.images[0].numpy(), want)
    assert (pad.images != stretch.images).flatten(1).any(1).all()  # every document is sized differently


def png(im: Image.Image, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kwargs)  # type: ignore[arg-type]
    return buf.getvalue()


def test_alpha_is_shown_on_white_and_exif_rotation_is_applied():
    rgba = np.zeros((8, 8, 4), np.uint8)  # black, but fully transparent except the top row
    rgba[0, :, 3] = 255
    rgba[1, :, 3] = 128  # half transparent: half way from white to black
    got = file_to_levels(png(Image.fromarray(rgba)), (1, 8, 8), 256)[0]
    assert (got[0] == 0).all() and (np.abs(got[1].astype(int) - 127) <= 1).all() and (got[2:] == 255).all()
    tall = np.zeros((8, 8), np.uint8)
    tall[0] = 200  # a bright top row, stored upside down with EXIF orientation 3 (rotate 180)
    exif = Image.Exif()
    exif[0x0112] = 3
    rotated = file_to_levels(png(Image.fromarray(tall[::-1].copy()), exif=exif), (1, 8, 8), 256)[0]
    assert (rotated[0] == 200).all() and (rotated[-1] == 0).all()


def test_pad_keeps_the_aspect_ratio_on_the_edge_colour():
    from models.image_convert import edge_colour, to_model_array

    banner = np.full((30, 120), 40, np.uint8)  # a wide dark banner with a light bar across its middle
    banner[12:18, 10:110] = 220
    arr, converted = to_model_array(Image.fromarray(banner), (1, 28, 28))  # fit="pad", the default
    assert converted and arr.shape == (1, 28, 28)
    assert edge_colour(Image.fromarray(banner)) == 40
    band = np.flatnonzero((arr[0] != 40).any(axis=1))  # rows that are not the background
    assert band.min() >= 10 and band.max() <= 16  # 120x30 -> 28x7, centred: rows 10..16 hold the banner
    assert (arr[0, :10] == 40).all() and (arr[0, 17:] == 40).all()
    stretched, _ = to_model_array(Image.fromarray(banner), (1, 28, 28), fit="stretch")
    lit = np.flatnonzero((stretched[0] > 128).any(axis=1))
    assert lit.max() - lit.min() >= 4  # stretched, the 6-pixel bar is 5-6 rows tall; padded, about one
    assert (np.flatnonzero((arr[0] > 128).any(axis=1)).size) <= 2


def test_pad_tall_and_colour_images_and_extreme_ratios():
    from models.image_convert import letterbox, to_model_array

    tall = np.zeros((90, 30, 3), np.uint8)
    tall[..., 2] = 255  # blue ground
    tall[40:50, 10:20] = (255, 255, 0)  # a yellow square in the middle
    padded = letterbox(Image.fromarray(tall), (28, 28))
    a = np.asarray(padded)
    assert padded.size == (28, 28) and padded.mode == "RGB"
    assert (a[:, :9] == (0, 0, 255)).all() and (a[:, 19:] == (0, 0, 255)).all()  # 30x90 -> 9x28 in columns 9..17
    line = Image.fromarray(np.full((1, 5000), 255, np.uint8))  # a one-pixel line: at least one row survives
    arr, _ = to_model_array(line, (1, 28, 28))
    assert arr.shape == (1, 28, 28) and (arr == 255).all()  # its own colour is its edge colour
    square = Image.fromarray(np.arange(56 * 56, dtype=np.uint32).reshape(56, 56).astype(np.uint8))
    a_pad, _ = to_model_array(square, (1, 28, 28))
    a_str, _ = to_model_array(square, (1, 28, 28), fit="stretch")
    np.testing.assert_array_equal(a_pad, a_str)  # the model's aspect ratio: both fits agree
    with pytest.raises(ValueError, match="fit must be one of"):
        to_model_array(square, (1, 28, 28), fit="crop")


@pytest.mark.parametrize("shape", [(30, 120), (90, 30, 3), (1, 500), (7, 1), (1, 1, 3)])
def test_edge_colour_is_the_median_of_the_four_edges(shape):
    from models.image_convert import edge_colour

    a = np.random.default_rng(sum(shape)).integers(0, 256, size=shape, dtype=np.uint8)
    b = a[..., None] if a.ndim == 2 else a
    median = np.round(np.median(np.concatenate([b[0], b[-1], b[:, 0], b[:, -1]]), axis=0)).astype(int).tolist()
    assert edge_colour(Image.fromarray(a)) == (median[0] if len(median) == 1 else tuple(median))
