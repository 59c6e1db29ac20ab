"""/score's outlier fields against calibrated tiny checkpoints: a PixelCNN with a background companion
(likelihood_ratio) and a VAE; score_type selection, heatmaps, errors and the flagged-outlier count."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import save_checkpoint, update_metadata
from models.pixelcnn import PixelCNN, PixelCNNConfig
from models.scoring.coders import code_length_bits
from models.scoring.scorer import load_scorer
from models.tools.score_sets import calibrate
from service.entries import RegistryError
from tests.helpers import TINY_PIXELCNN, dataset_meta
from tests.service.helpers import b64, decode_png, gray_png, png_bytes, running

pytestmark = pytest.mark.anyio


def calibration_images(n: int = 40) -> torch.Tensor:
    """Dark 8x8 noise: what the tiny (untrained) models are calibrated on."""
    rng = np.random.default_rng(0)
    return torch.from_numpy(rng.integers(0, 32, size=(n, 1, 8, 8), dtype=np.uint8))


@pytest.fixture(scope="module")
def calibrated_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pc: the tiny PixelCNN with itself as background; vae: the tiny VAE; both calibrated at 10% FPR."""
    root = tmp_path_factory.mktemp("calibrated")
    shutil.copytree(model_dir / "pixelcnn", root / "pc")
    shutil.copytree(model_dir / "pixelcnn", root / "pc" / "background")
    shutil.copytree(model_dir / "vae", root / "vae")
    for name in ("pc", "vae"):
        scorer, _ = load_scorer(root / name)
        cal = calibrate(scorer, calibration_images(), data_spec="test", fpr=0.1, show_progress=False)
        update_metadata(root / name, calibration=cal)
    return root


@pytest.fixture
async def client(make_settings, calibrated_dir: Path):
    async with running(make_settings(model_dir=calibrated_dir)) as (app, client):
        yield app, client


def noise_png(seed: int) -> str:
    return b64(gray_png(seed))


def dark_png() -> str:
    return b64(png_bytes(np.full((8, 8), 3, np.uint8)))


async def test_models_show_score_types_default_calibration_and_background(client):
    _, c = client
    models = {m["name"]: m for m in (await c.get("/models")).json()["models"]}
    pc, vae = models["pc"], models["vae"]
    assert pc["score_types"] == ["complexity", "complexity_guarded", "dose", "likelihood_ratio", "nll"]
    assert vae["score_types"] == ["complexity", "complexity_guarded", "dose", "nll"] and vae["background"] is None
    assert pc["default_score_type"] == "dose" == pc["calibration"]["default_score"]
    assert pc["background"]["architecture"] == "gated_pixelcnn" and len(pc["background"]["sha256"]) == 64
    assert set(pc["calibration"]["scores"]) == {"complexity", "complexity_guarded", "dose", "likelihood_ratio", "nll"}
    assert vae["calibration"]["vae_score_k"] == 1
    # the nearest-neighbour combination's reference (a megabyte for a real calibration) stays in model.json
    assert pc["calibration"]["dose"]["neighbours"] == 5 and "reference" not in pc["calibration"]["dose"]


@pytest.mark.parametrize("model", ["pc", "vae"])
async def test_every_result_carries_consistent_outlier_fields(client, model: str):
    app, c = client
    imgs = [noise_png(0), noise_png(1), dark_png()]
    r = await c.post("/score", json={"model": model, "images": imgs, "score_type": "complexity_guarded"})
    assert r.status_code == 200
    body = r.json()
    assert body["score_type"] == "complexity_guarded"
    cal = (await c.get(f"/models/{model}")).json()["calibration"]["scores"]["complexity"]
    for res in body["results"]:
        assert res["threshold"] == cal["threshold"]
        assert res["is_outlier"] is (res["score"] > res["threshold"])
        assert 0.0 <= res["percentile"] <= 100.0
    # An untrained model is uniform, so the simplest image is the surprising one under the complexity score.
    flags = [res["is_outlier"] for res in body["results"]]
    assert flags == [False, False, True]
    flagged = app.state.metrics.sample_value(
        "genserve_outliers_flagged_total", {"model": model, "score_type": "complexity_guarded"}
    )
    assert flagged == sum(flags)


async def test_score_type_selection(client):
    _, c = client
    img = [noise_png(0)]
    out = {}
    for score_type in ("nll", "complexity", "likelihood_ratio"):
        r = await c.post("/score", json={"model": "pc", "images": img, "score_type": score_type})
        assert r.status_code == 200 and r.json()["score_type"] == score_type
        out[score_type] = r.json()["results"][0]
    assert out["nll"]["score"] == pytest.approx(out["nll"]["bits_per_dim"])
    bits = float(code_length_bits(torch.from_numpy(np.array(decode_png(img[0]))[None, None]), levels=256)[0])
    assert bits == 64 * 8 + 1  # noise: the raw fallback
    assert out["complexity"]["score"] == pytest.approx(out["nll"]["score"] - bits / 64, abs=1e-6)
    assert out["likelihood_ratio"]["score"] == pytest.approx(0.0, abs=1e-9)  # background = the model itself
    assert len({o["threshold"] for o in out.values()}) == 3  # each score type has its own calibration


async def test_unknown_score_type_lists_the_models_own_types(client):
    _, c = client
    r = await c.post("/score", json={"model": "pc", "images": [dark_png()], "score_type": "magic"})
    assert r.status_code == 422
    assert (
        r.json()["detail"] == "unknown score_type 'magic'; model 'pc' offers "
        "['complexity', 'complexity_guarded', 'dose', 'likelihood_ratio', 'nll']"
    )
    r = await c.post("/score", json={"model": "vae", "images": [dark_png()], "score_type": "likelihood_ratio"})
    assert r.status_code == 422
    assert (
        r.json()["detail"] == "unknown score_type 'likelihood_ratio'; model 'vae' offers "
        "['complexity', 'complexity_guarded', 'dose', 'nll']"
    )


async def test_heatmaps_per_score_type(client):
    _, c = client
    img = [noise_png(0)]
    r = await c.post("/score", json={"model": "pc", "images": img, "heatmap": True})
    res = r.json()["results"][0]
    im = np.asarray(decode_png(res["heatmap"]), dtype=np.float64)
    assert im.shape == (8, 8) and im.min() >= 0 and im.max() <= 255 and im.max() > 0
    assert res["heatmap_scale_nats"] == pytest.approx(math.log(256))
    # The likelihood-ratio map subtracts the background's per-pixel NLL: here the model itself, so all black.
    body = {"model": "pc", "images": img, "heatmap": True, "score_type": "likelihood_ratio"}
    ratio = (await c.post("/score", json=body)).json()["results"][0]
    assert np.asarray(decode_png(ratio["heatmap"])).max() == 0


async def test_a_background_that_does_not_fit_stops_startup(make_settings, model_dir: Path, tmp_path: Path):
    shutil.copytree(model_dir / "pixelcnn", tmp_path / "pc")
    bg = PixelCNN(PixelCNNConfig(**{**TINY_PIXELCNN, "height": 4, "width": 4}))
    save_checkpoint(bg, tmp_path / "pc" / "background", dataset=dataset_meta())
    with pytest.raises(RegistryError, match="the background model takes"):
        async with running(make_settings(model_dir=tmp_path)):
            pass


async def test_a_stale_calibration_stops_startup(make_settings, calibrated_dir: Path, tmp_path: Path):
    shutil.copytree(calibrated_dir / "pc", tmp_path / "pc")
    shutil.rmtree(tmp_path / "pc" / "background")  # the ratio's threshold was computed against it
    with pytest.raises(RegistryError, match=r"calibration is stale \(it was computed with another background"):
        async with running(make_settings(model_dir=tmp_path)):
            pass
