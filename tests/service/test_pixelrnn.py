"""A Row LSTM PixelRNN through the service: /sample (cached sampler, exact bits/dim of what it drew,
reproducible), /sample/stream, /score equal to the model's own log-likelihood, labels by name."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import load_checkpoint, save_checkpoint
from models.pixelrnn import PixelRNN, PixelRNNConfig
from tests.helpers import dataset_meta
from tests.service.helpers import b64, decode_png, png_bytes, running

pytestmark = pytest.mark.anyio
TINY_RNN = {"height": 8, "width": 8, "hidden": 6, "n_layers": 2, "input_kernel": 3, "state_kernel": 3, "out_hidden": 8}


@pytest.fixture(scope="module")
def rnn_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pixelrnn")
    torch.manual_seed(0)
    save_checkpoint(PixelRNN(PixelRNNConfig(**TINY_RNN)), root / "rnn", dataset=dataset_meta())
    save_checkpoint(
        PixelRNN(PixelRNNConfig(**TINY_RNN, n_classes=2)), root / "rnn-cond", dataset=dataset_meta(["shoe", "bag"])
    )
    return root


async def test_pixelrnn_samples_with_exact_likelihoods_and_scores(make_settings, rnn_dir: Path):
    model, _ = load_checkpoint(rnn_dir / "rnn")
    async with running(make_settings(model_dir=rnn_dir)) as (_app, c):
        info = (await c.get("/models/rnn")).json()
        assert info["kind"] == "autoregressive" and info["architecture"] == "row_lstm"
        a = await c.post("/sample", json={"model": "rnn", "n": 3, "seed": 4, "temperature": 0.9})
        b = await c.post("/sample", json={"model": "rnn", "n": 3, "seed": 4, "temperature": 0.9})
        assert a.status_code == 200, a.text
        assert a.json()["images"] == b.json()["images"]
        drawn = np.stack([np.asarray(decode_png(s)) for s in a.json()["images"]])
        assert drawn.shape == (3, 8, 8) and len({d.tobytes() for d in drawn}) == 3

        x = torch.from_numpy(drawn)[:, None]
        with torch.no_grad():
            nats = model.log_prob(x)
        bpd = (-nats / (64 * math.log(2))).tolist()
        assert a.json()["bits_per_dim"] == pytest.approx(bpd, abs=1e-5)  # the model's own p(sample)

        r = await c.post("/score", json={"model": "rnn", "images": [b64(png_bytes(d)) for d in drawn]})
        assert r.status_code == 200, r.text
        got = [res["log_likelihood_nats"] for res in r.json()["results"]]
        assert got == pytest.approx(nats.tolist(), rel=1e-5)

        s = await c.post("/sample/stream?partial_every=4", json={"model": "rnn", "n": 3, "seed": 4, "temperature": 0.9})
        events = [line[len("data: ") :] for line in s.text.splitlines() if line.startswith("data: ")]
        assert json.loads(events[-1])["images"] == a.json()["images"]


async def test_conditional_pixelrnn_takes_a_label_by_name(make_settings, rnn_dir: Path):
    async with running(make_settings(model_dir=rnn_dir)) as (_app, c):
        by_name = await c.post("/sample", json={"model": "rnn-cond", "n": 2, "seed": 1, "label": "bag"})
        by_index = await c.post("/sample", json={"model": "rnn-cond", "n": 2, "seed": 1, "label": 1})
        other = await c.post("/sample", json={"model": "rnn-cond", "n": 2, "seed": 1, "label": 0})
        assert by_name.status_code == 200, by_name.text
        assert by_name.json()["images"] == by_index.json()["images"] != other.json()["images"]
        bad = await c.post("/sample", json={"model": "rnn-cond", "n": 1, "label": "hat"})
        assert bad.status_code == 422 and "bag" in bad.json()["detail"]
