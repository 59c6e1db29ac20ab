"""A companion model's statistics in a model's dose score: ``genserve calibrate --companion``, the
statistics pass, the staleness checks and /score's explanation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import read_metadata, save_checkpoint, sha256_file
from models.pixelcnn import PixelCNN, PixelCNNConfig
from models.scoring.scorer import COMPANION, load_scorer, stale_calibration
from models.scoring.statistics import COMPANION_PREFIX, model_statistics, statistic_names
from models.tools.cli import main
from models.tools.companion import install_companion
from models.tools.score_sets import dataset_statistics
from models.vae import VAE, VAEConfig
from tests.helpers import TINY_PIXELCNN, TINY_VAE, dataset_meta
from tests.service.helpers import b64, gray_png, running


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """(a tiny PixelCNN's folder, a tiny VAE's folder), both under tmp_path/models."""
    torch.manual_seed(0)
    root = tmp_path / "models"
    save_checkpoint(PixelCNN(PixelCNNConfig(**TINY_PIXELCNN)), root / "ar", dataset=dataset_meta())
    save_checkpoint(VAE(VAEConfig(**TINY_VAE)), root / "vae", dataset=dataset_meta())
    return root / "ar", root / "vae"


def valid_npz(path: Path, n: int = 40) -> str:
    rng = np.random.default_rng(0)
    np.savez(path, images=rng.integers(0, 64, size=(n, 8, 8), dtype=np.uint8))
    return f"npz:{path}"


def test_install_copies_the_weights_and_refuses_what_cannot_be_a_companion(folders, tmp_path: Path):
    ar, vae = folders
    meta = install_companion(vae, ar)
    assert sha256_file(ar / COMPANION / "model.safetensors") == read_metadata(vae)["weights"]["sha256"]
    assert "calibration" not in read_metadata(ar / COMPANION) and meta["companion_of"]["model"] == "ar"
    install_companion(vae, ar)  # replacing works, and leaves no temporary folder behind
    assert sorted(p.name for p in ar.iterdir()) == [COMPANION, "model.json", "model.safetensors"]
    with pytest.raises(ValueError, match="its own companion"):
        install_companion(ar, ar)
    cond = tmp_path / "cond"
    save_checkpoint(PixelCNN(PixelCNNConfig(**TINY_PIXELCNN, n_classes=3)), cond, dataset=dataset_meta(["a", "b", "c"]))
    with pytest.raises(ValueError, match="unconditional"):
        install_companion(cond, ar)


def test_the_companions_statistics_are_its_own_pass_prefixed(folders):
    ar, vae = folders
    install_companion(vae, ar)
    scorer, _ = load_scorer(ar)
    assert scorer.companion is not None
    names = statistic_names(scorer)
    assert {"companion_nll", "companion_kl", "companion_latent", "companion_flip"} <= set(names)
    assert "companion_border" not in names  # the image's own statistics are not the companion's
    x = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    got = model_statistics(scorer, x)
    alone = model_statistics(load_scorer(vae)[0], x)
    for n in ("nll", "kl", "latent", "flip"):
        assert torch.equal(got[COMPANION_PREFIX + n], alone[n])


def test_calibrate_with_a_companion_combines_it_and_records_its_weights(folders, tmp_path: Path, capsys):
    ar, vae = folders
    valid = valid_npz(tmp_path / "valid.npz")
    cache = str(tmp_path / "cache")
    argv = ["calibrate", "--model", str(ar), "--data", valid, "--fpr", "0.1", "--no-progress", "--cache", cache]
    assert main([*argv, "--companion", str(vae)]) == 0
    meta = read_metadata(ar)
    cal = meta["calibration"]
    combined = [s["name"] for s in cal["dose"]["statistics"]]
    assert "companion_kl" in combined and "nll" in combined
    assert cal["companion_sha256"] == read_metadata(vae)["weights"]["sha256"]
    assert stale_calibration(meta, None, read_metadata(ar / COMPANION)) is None
    # the companion's statistics are cached under its own key: the dose scores repeat exactly
    scorer, _ = load_scorer(ar)
    images = torch.from_numpy(np.load(str(tmp_path / "valid.npz"))["images"])[:, None]
    first = dataset_statistics(scorer, images, cache_dir=cache, show_progress=False)
    again = model_statistics(scorer, images)
    for n in combined:
        assert np.allclose(first[n], again[n].numpy(), rtol=1e-5, atol=1e-6), n
    # a calibration that leaves the companion out skips its pass
    capsys.readouterr()
    assert main([*argv, "--statistics", "nll,complexity,flip"]) == 0
    scorer, _ = load_scorer(ar)
    assert all(not n.startswith(COMPANION_PREFIX) for n in statistic_names(scorer))


def test_a_changed_or_missing_companion_makes_the_calibration_stale(folders, tmp_path: Path):
    ar, vae = folders
    assert main(["calibrate", "--model", str(ar), "--data", valid_npz(tmp_path / "v.npz"), "--no-progress",
                 "--cache", "", "--companion", str(vae)]) == 0  # fmt: skip
    meta = read_metadata(ar)
    other = tmp_path / "other-vae"
    torch.manual_seed(1)
    save_checkpoint(VAE(VAEConfig(**TINY_VAE)), other, dataset=dataset_meta())
    assert "another companion" in (stale_calibration(meta, None, read_metadata(other)) or "")
    assert "companion/ is missing" in (stale_calibration(meta, None, None) or "")


pytestmark = pytest.mark.anyio


async def test_score_explains_with_the_companions_statistics(folders, tmp_path: Path, make_settings):
    ar, vae = folders
    assert main(["calibrate", "--model", str(ar), "--data", valid_npz(tmp_path / "v.npz"), "--fpr", "0.1",
                 "--no-progress", "--cache", "", "--companion", str(vae)]) == 0  # fmt: skip
    settings = make_settings(model_dir=ar.parent, models="ar")
    async with running(settings) as (_, client):
        info = (await client.get("/models/ar")).json()
        assert info["companion"]["sha256"] == read_metadata(vae)["weights"]["sha256"]
        r = await client.post("/score", json={"model": "ar", "images": [b64(gray_png(3))]})
        assert r.status_code == 200, r.text
        (result,) = r.json()["results"]
        stats = result["explanation"]["statistics"]
        assert "companion_kl" in stats and "nll" in stats
    # the service refuses a folder whose companion no longer matches its calibration
    (ar / COMPANION / "model.json").write_text(
        json.dumps({**read_metadata(ar / COMPANION), "weights": {"file": "model.safetensors", "sha256": "0" * 64}})
    )
    with pytest.raises(Exception, match="stale"):
        async with running(settings):
            pass
