"""A VAE with a local autoregressive decoder (PixelVAE-style) through the service: /sample draws
pixel by pixel and is reproducible, /score returns the model's own IWAE estimate, /encode works."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import load_checkpoint, save_checkpoint
from models.vae import VAE, VAEConfig
from tests.helpers import TINY_VAE, dataset_meta
from tests.service.helpers import b64, decode_png, png_bytes, running, worker_of

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def pixelvae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pixelvae")
    torch.manual_seed(0)
    model = VAE(VAEConfig(**TINY_VAE, decoder_context=3, context_layers=1))
    with torch.no_grad():  # the context path starts as a no-op; give it weight so the test sees it
        model.decoder.ctx_out.weight.normal_(0.0, 0.5)
    save_checkpoint(model, root / "pixelvae", dataset=dataset_meta())
    return root


async def test_pixelvae_samples_scores_and_encodes(make_settings, pixelvae_dir: Path):
    model, _ = load_checkpoint(pixelvae_dir / "pixelvae")
    async with running(make_settings(model_dir=pixelvae_dir)) as (app, c):
        served = worker_of(app, "pixelvae").model  # a CPU worker runs it channels-last (prepare_for_inference)
        for m, want in ((served, True), (model, False)):
            conv = next(
                c
                for c in m.modules()
                if isinstance(c, torch.nn.Conv2d) and c.weight.shape[1] > 1 and c.weight.shape[-1] > 1
            )
            assert conv.weight.is_contiguous(memory_format=torch.channels_last) is want
        a = await c.post("/sample", json={"model": "pixelvae", "n": 3, "seed": 4})
        b = await c.post("/sample", json={"model": "pixelvae", "n": 3, "seed": 4})
        assert a.status_code == 200, a.text
        assert a.json()["images"] == b.json()["images"] and a.json()["bits_per_dim"] is None
        drawn = np.stack([np.asarray(decode_png(s)) for s in a.json()["images"]])
        assert drawn.shape == (3, 8, 8) and len({d.tobytes() for d in drawn}) == 3

        x = torch.from_numpy(drawn)[:, None]
        r = await c.post("/score", json={"model": "pixelvae", "images": [b64(png_bytes(d)) for d in drawn]})
        assert r.status_code == 200, r.text
        with torch.no_grad():
            k = 1  # an uncalibrated VAE is scored with one importance sample (the calibrated default)
            expected = model.iwae(x, k=k)
        got = [res["log_likelihood_nats"] for res in r.json()["results"]]
        assert got == pytest.approx(expected.tolist(), rel=1e-5)

        e = await c.post("/encode", json={"model": "pixelvae", "images": [b64(png_bytes(drawn[0]))]})
        assert e.status_code == 200 and len(e.json()["results"][0]["mean"]) == TINY_VAE["latent_dim"]
