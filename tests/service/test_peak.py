"""The peak check through /score and /classify: an image far dimmer than every calibration image is
refused whatever its score, with the reason in the answer; whether or not it was converted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import META, read_metadata, update_metadata
from models.scoring.scorer import load_scorer
from models.tools.score_sets import calibrate
from service.entries import RegistryError
from tests.service.helpers import b64, png_bytes, running
from tests.service.test_colour import post_files

pytestmark = pytest.mark.anyio


def bright(n: int, seed: int = 0) -> torch.Tensor:
    """8x8 noise whose brightest pixel is 255 in every image (as in Fashion-MNIST, every image reaches white)."""
    x = np.random.default_rng(seed).integers(0, 200, size=(n, 1, 8, 8), dtype=np.uint8)
    x[:, 0, 3, 3] = 255
    return torch.from_numpy(x)


@pytest.fixture(scope="module")
def peak_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pc: tiny PixelCNN calibrated with the default peak check; plain: without one; cond: the tiny
    conditional PixelCNN, with it."""
    root = tmp_path_factory.mktemp("peak")
    for name, source, tolerance in (("pc", "pixelcnn", 64), ("plain", "pixelcnn", None), ("cond", "pixelcnn-cond", 64)):
        shutil.copytree(model_dir / source, root / name)
        scorer, _ = load_scorer(root / name)
        cal = calibrate(scorer, bright(30), data_spec="test", fpr=0.2, show_progress=False, peak_tolerance=tolerance)
        update_metadata(root / name, calibration=cal)
    return root


def dimmed() -> tuple[bytes, bytes]:
    """A calibration image as a PNG, and the same at 70% of its intensity (brightest pixel 178 < 255 - 64)."""
    x = bright(30)[0, 0].numpy()
    return png_bytes(x), png_bytes(np.round(x * 0.7).astype(np.uint8))


async def test_a_dim_image_is_refused_whatever_its_score(make_settings, peak_dir: Path):
    same, dim = dimmed()
    async with running(make_settings(model_dir=peak_dir)) as (_, c):
        info = {m["name"]: m for m in (await c.get("/models")).json()["models"]}
        assert info["pc"]["calibration"]["peak"]["min_level"] == 255
        assert "peak" not in info["plain"]["calibration"]
        r = await c.post("/score", json={"model": "pc", "images": [b64(same), b64(dim)]})  # no conversion
        assert r.status_code == 200, r.text
        ok, low = r.json()["results"]
        assert ok["peak"] == {"level": 255, "floor": 191, "min_level": 255, "crossed": False}
        assert low["peak"] == {"level": 178, "floor": 191, "min_level": 255, "crossed": True}
        assert low["is_outlier"] is True and low["explanation"]["decided_by"][0] == "peak"
        assert ok["explanation"]["decided_by"][:1] != ["peak"]
        nll = (await post_files(c, "/score", "pc", [dim], score_type="nll")).json()["results"][0]  # any score type
        assert nll["is_outlier"] is True and nll["peak"]["crossed"]
        plain = (await c.post("/score", json={"model": "plain", "images": [b64(dim)]})).json()["results"][0]
        assert plain["peak"] is None and plain["is_outlier"] == (plain["score"] > plain["threshold"])


async def test_classify_rejects_a_dim_image(make_settings, peak_dir: Path):
    same, dim = dimmed()
    async with running(make_settings(model_dir=peak_dir)) as (_, c):
        r = await post_files(c, "/classify", "cond", [dim, same])
        assert r.status_code == 200, r.text
        low, ok = r.json()["results"]
        assert low["rejected"] is True and low["predicted"] is None and low["peak"]["crossed"]
        assert ok["peak"]["crossed"] is False


async def test_a_malformed_peak_check_stops_startup(make_settings, peak_dir: Path, tmp_path: Path):
    shutil.copytree(peak_dir / "pc", tmp_path / "pc")
    meta = read_metadata(tmp_path / "pc")
    meta["calibration"]["peak"] = {"min_level": 300, "tolerance": 64}
    (tmp_path / "pc" / META).write_text(json.dumps(meta))
    with pytest.raises(RegistryError, match=r"calibration\.peak is malformed"):
        async with running(make_settings(model_dir=tmp_path)):
            pass
