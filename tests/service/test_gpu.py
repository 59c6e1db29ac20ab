"""The service on CUDA workers (skipped on machines without a GPU)."""

from __future__ import annotations

import pytest
import torch

from tests.service.helpers import b64, gray_png, running, worker_of

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


async def test_auto_devices_serve_on_every_gpu(make_settings):
    async with running(make_settings(devices="auto")) as (app, client):
        n = torch.cuda.device_count()
        info = (await client.get("/models/pixelcnn")).json()
        assert info["devices"] == [f"cuda:{i}" for i in range(n)]
        assert worker_of(app, "pixelcnn").model.device.type == "cuda"
        assert (await client.get("/readyz")).status_code == 200

        a = (await client.post("/sample", json={"model": "pixelcnn", "n": 3, "seed": 9})).json()
        b = (await client.post("/sample", json={"model": "pixelcnn", "n": 3, "seed": 9})).json()
        assert a["images"] == b["images"] and len(a["bits_per_dim"]) == 3
        r = await client.post("/sample", json={"model": "vae", "n": 2, "seed": 1})
        assert r.status_code == 200
        r = await client.post("/sample", json={"model": "pixelcnn-cond", "n": 2, "seed": 1, "label": "c"})
        assert r.status_code == 200

        images = [b64(gray_png(i)) for i in range(40)]
        r = await client.post("/score", json={"model": "pixelcnn", "images": images, "heatmap": True})
        assert r.status_code == 200 and len(r.json()["results"]) == 40
        r = await client.post("/score", json={"model": "vae", "images": images[:5]})
        assert r.status_code == 200

        metrics = (await client.get("/metrics")).text
        assert 'genserve_device_memory_bytes{device="cuda:0",type="allocated"}' in metrics


async def test_gpu_scores_match_cpu(make_settings):
    body = {"model": "pixelcnn", "images": [b64(gray_png(i)) for i in range(4)]}
    async with running(make_settings(models="pixelcnn", devices="cuda:0")) as (_, client):
        gpu = (await client.post("/score", json=body)).json()["results"]
    async with running(make_settings(models="pixelcnn", devices="cpu")) as (_, client):
        cpu = (await client.post("/score", json=body)).json()["results"]
    for g, c in zip(gpu, cpu, strict=True):
        assert g["log_likelihood_nats"] == pytest.approx(c["log_likelihood_nats"], rel=1e-4)


async def test_cuda_graph_sampling_serves_the_same_images(make_settings):
    body = {"model": "pixelcnn", "n": 4, "seed": 3}
    async with running(make_settings(models="pixelcnn", devices="cuda:0", cuda_graphs=True)) as (app, client):
        assert worker_of(app, "pixelcnn").model.sample_cuda_graphs is True
        graphs = (await client.post("/sample", json=body)).json()
    async with running(make_settings(models="pixelcnn", devices="cuda:0", cuda_graphs=False)) as (app, client):
        assert worker_of(app, "pixelcnn").model.sample_cuda_graphs is False
        plain = (await client.post("/sample", json=body)).json()
    assert graphs["images"] == plain["images"]
    assert graphs["bits_per_dim"] == pytest.approx(plain["bits_per_dim"], abs=1e-5)


async def test_compiled_likelihood_serves_the_same_scores(make_settings):
    images = [b64(gray_png(i)) for i in range(5)]  # a batch of 5: padded to 8
    body = {"model": "pixelcnn", "images": images, "score_type": "nll"}
    async with running(make_settings(models="pixelcnn", devices="cuda:0", compile=True, max_batch_size=8)) as (
        app,
        client,
    ):
        compiled = worker_of(app, "pixelcnn").model.compiled_log_prob
        assert compiled is not None and {1, 2, 4, 8} <= compiled.sizes_run  # all compiled at warm-up
        fast = (await client.post("/score", json=body)).json()
    async with running(make_settings(models="pixelcnn", devices="cuda:0")) as (app, client):
        assert worker_of(app, "pixelcnn").model.compiled_log_prob is None
        plain = (await client.post("/score", json=body)).json()
    for f, p in zip(fast["results"], plain["results"], strict=True):
        assert f["log_likelihood_nats"] == pytest.approx(p["log_likelihood_nats"], rel=1e-5)
