"""The colour check through /score and /classify: a colour file sent with resize=true to a model of
grayscale images is refused whatever its score, with the reason in the answer; the same picture in
gray is judged by its score alone (the model sees the same array for both)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import META, read_metadata, update_metadata
from models.image_convert import file_colour_fraction
from models.scoring.scorer import load_scorer
from models.tools.score_sets import calibrate
from service.entries import RegistryError
from tests.service.helpers import b64, png_bytes, running

pytestmark = pytest.mark.anyio


def dark(n: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 40, size=(n, 1, 8, 8), dtype=np.uint8))


@pytest.fixture(scope="module")
def colour_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pc: tiny PixelCNN calibrated with the default colour check; plain: the same without one;
    cond: the tiny conditional PixelCNN calibrated on p(x), with the check."""
    root = tmp_path_factory.mktemp("colour")
    for name, source, colour in (
        ("pc", "pixelcnn", True),
        ("plain", "pixelcnn", False),
        ("cond", "pixelcnn-cond", True),
    ):
        shutil.copytree(model_dir / source, root / name)
        scorer, _ = load_scorer(root / name)
        kw = {} if colour else {"colour": None}
        cal = calibrate(scorer, dark(30), data_spec="test", fpr=0.2, show_progress=False, **kw)
        update_metadata(root / name, calibration=cal)
    return root


def tinted() -> tuple[bytes, bytes, float]:
    """The first calibration image (dark 8x8 noise) with colour added where it keeps the luma: (v + 40,
    v - 20, v) in its top half where v >= 20 (chroma 60); as a colour PNG, as its luma in gray (the
    calibration image itself), and the fraction of pixels tinted."""
    from PIL import Image

    g = dark(30)[0, 0].numpy()
    a = np.stack([g, g, g], axis=-1).astype(np.int64)
    where = np.zeros_like(g, dtype=bool)
    where[:4] = g[:4] >= 20
    a[where, 0] += 40
    a[where, 1] -= 20
    a = a.astype(np.uint8)
    gray = np.asarray(Image.fromarray(a).convert("L"))
    assert (gray == g).all()  # Pillow's luma of the tint is the calibration image again
    return png_bytes(a), png_bytes(gray), float(where.mean())


async def post_files(c, route: str, model: str, files: list[bytes], **fields: str):
    return await c.post(
        route,
        data={"model": model, "resize": "true", **fields},
        files=[("files", (f"f{i}.png", f, "image/png")) for i, f in enumerate(files)],
    )


async def test_colour_file_is_refused_and_its_gray_twin_is_judged_by_its_score(make_settings, colour_dir: Path):
    coloured, gray, tinted_share = tinted()
    async with running(make_settings(model_dir=colour_dir)) as (_, c):
        info = {m["name"]: m for m in (await c.get("/models")).json()["models"]}
        assert info["pc"]["calibration"]["colour"]["tolerance"] == 32
        assert "colour" not in info["plain"]["calibration"]
        r = await post_files(c, "/score", "pc", [coloured, gray])
        assert r.status_code == 200, r.text
        col, gra = r.json()["results"]
        assert col["score"] == gra["score"]  # the model sees the same luma
        assert col["colour"] == {
            "fraction": pytest.approx(file_colour_fraction(coloured, 32)),
            "tolerance": 32,
            "max_fraction": 0.01,
            "crossed": True,
        }
        assert col["colour"]["fraction"] == pytest.approx(tinted_share) and tinted_share > 0.1
        assert col["is_outlier"] is True and col["explanation"]["decided_by"] == ["colour"]  # its score passes
        assert gra["colour"]["fraction"] == 0.0 and gra["colour"]["crossed"] is False
        assert gra["score"] <= gra["threshold"] and gra["is_outlier"] is False
        assert gra["explanation"]["decided_by"] == []
        # every calibrated score type refuses it; the model without a check judges by the score alone
        nll = (await post_files(c, "/score", "pc", [coloured], score_type="nll")).json()["results"][0]
        assert nll["is_outlier"] is True and nll["colour"]["crossed"]
        plain = (await post_files(c, "/score", "plain", [coloured])).json()["results"][0]
        assert plain["colour"] is None and plain["is_outlier"] is False


async def test_images_not_converted_are_not_checked(make_settings, colour_dir: Path):
    async with running(make_settings(model_dir=colour_dir)) as (_, c):
        _, gray, _ = tinted()
        res = (await c.post("/score", json={"model": "pc", "images": [b64(gray)]})).json()["results"][0]
        assert res["colour"] is None and res["is_outlier"] is False
        # without resize a colour file is refused by its mode, as before
        coloured, _, _ = tinted()
        r = await c.post("/score", data={"model": "pc"}, files=[("files", ("a.png", coloured, "image/png"))])
        assert r.status_code == 422 and "resize=true" in r.json()["detail"]


async def test_classify_rejects_a_colour_file(make_settings, colour_dir: Path):
    coloured, gray, _ = tinted()
    async with running(make_settings(model_dir=colour_dir)) as (_, c):
        r = await post_files(c, "/classify", "cond", [coloured, gray])
        assert r.status_code == 200, r.text
        col, gra = r.json()["results"]
        assert col["rejected"] is True and col["predicted"] is None and col["colour"]["crossed"]
        assert gra["rejected"] is False and gra["predicted"] is not None and not gra["colour"]["crossed"]
        assert col["posterior"] == gra["posterior"]  # the same luma, the same p(y|x)


async def test_a_malformed_colour_check_stops_startup(make_settings, colour_dir: Path, tmp_path: Path):
    shutil.copytree(colour_dir / "pc", tmp_path / "pc")
    meta = read_metadata(tmp_path / "pc")
    meta["calibration"]["colour"] = {"tolerance": 300, "max_fraction": 0.01}
    (tmp_path / "pc" / META).write_text(json.dumps(meta))
    with pytest.raises(RegistryError, match=r"calibration\.colour is malformed"):
        async with running(make_settings(model_dir=tmp_path)):
            pass
