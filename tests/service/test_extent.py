"""The extent check through /score and /classify: an image whose object spans far less of the frame
than every calibration image's is refused whatever its score, with the reason in the answer; whether
or not it was converted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.checkpoint import META, read_metadata, update_metadata
from models.scoring.scorer import load_scorer
from models.tools.score_sets import calibrate
from service.entries import RegistryError
from tests.service.helpers import b64, png_bytes, running
from tests.service.test_colour import post_files
from tests.service.test_peak import bright

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def extent_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pc: tiny PixelCNN calibrated on images that fill their 8x8 frame, with the default extent check
    (tolerance 2); plain: without one; cond: the tiny conditional PixelCNN, with it."""
    root = tmp_path_factory.mktemp("extent")
    for name, source, tolerance in (("pc", "pixelcnn", 2), ("plain", "pixelcnn", None), ("cond", "pixelcnn-cond", 2)):
        shutil.copytree(model_dir / source, root / name)
        scorer, _ = load_scorer(root / name)
        cal = calibrate(scorer, bright(30), data_spec="test", fpr=0.2, show_progress=False, extent_tolerance=tolerance)
        update_metadata(root / name, calibration=cal)
    return root


def small_mark(size: int = 8) -> bytes:
    """A white 3x3 square (3/8 of the frame) in the middle of a black ``size`` x ``size`` PNG."""
    x = np.zeros((size, size), np.uint8)
    lo = size * 3 // 8
    x[lo : lo + size * 3 // 8, lo : lo + size * 3 // 8] = 255
    return png_bytes(x)


async def test_a_small_mark_on_a_clean_ground_is_refused_whatever_its_score(make_settings, extent_dir: Path):
    full = png_bytes(bright(30)[0, 0].numpy())
    async with running(make_settings(model_dir=extent_dir)) as (_, c):
        info = {m["name"]: m for m in (await c.get("/models")).json()["models"]}
        assert info["pc"]["calibration"]["extent"]["min_extent"] == 8
        assert "extent" not in info["plain"]["calibration"]
        r = await c.post("/score", json={"model": "pc", "images": [b64(full), b64(small_mark())]})  # no conversion
        assert r.status_code == 200, r.text
        ok, small = r.json()["results"]
        assert ok["extent"] == {"pixels": 8, "floor": 6, "min_extent": 8, "crossed": False}
        assert small["extent"] == {"pixels": 3, "floor": 6, "min_extent": 8, "crossed": True}
        assert small["is_outlier"] is True and "extent" in small["explanation"]["decided_by"][:2]
        assert "extent" not in ok["explanation"]["decided_by"]
        converted = (await post_files(c, "/score", "pc", [small_mark(48)], score_type="nll")).json()["results"][0]
        assert converted["resized"] and converted["is_outlier"] is True and converted["extent"]["crossed"]
        plain = (await c.post("/score", json={"model": "plain", "images": [b64(small_mark())]})).json()["results"][0]
        assert plain["extent"] is None and plain["is_outlier"] == (plain["score"] > plain["threshold"])


async def test_classify_rejects_a_small_mark(make_settings, extent_dir: Path):
    full = png_bytes(bright(30)[0, 0].numpy())
    async with running(make_settings(model_dir=extent_dir)) as (_, c):
        r = await post_files(c, "/classify", "cond", [small_mark(), full])
        assert r.status_code == 200, r.text
        small, ok = r.json()["results"]
        assert small["rejected"] is True and small["predicted"] is None and small["extent"]["crossed"]
        assert ok["extent"]["crossed"] is False


async def test_a_malformed_extent_check_stops_startup(make_settings, extent_dir: Path, tmp_path: Path):
    shutil.copytree(extent_dir / "pc", tmp_path / "pc")
    meta = read_metadata(tmp_path / "pc")
    meta["calibration"]["extent"] = {"min_extent": 8, "tolerance": 2}  # no level
    (tmp_path / "pc" / META).write_text(json.dumps(meta))
    with pytest.raises(RegistryError, match=r"calibration\.extent is malformed"):
        async with running(make_settings(model_dir=tmp_path)):
            pass
