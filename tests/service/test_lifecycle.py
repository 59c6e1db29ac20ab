"""Model versions (service/lifecycle.py): reload swaps atomically, a refused version leaves the old one
serving, unload drains, the watcher picks up changed files, the admin API needs an admin key.

Synchronisation waits on events (a gated model's ``entered``), never on sleeps.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import threading
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import torch
from PIL import Image

from models.checkpoint import WEIGHTS, read_metadata, save_checkpoint, update_metadata
from models.pixelcnn import PixelCNN, PixelCNNConfig
from models.scoring.scorer import load_scorer
from service.batching import State
from service.watch import Watcher
from tests.helpers import TINY_PIXELCNN, dataset_meta
from tests.service.helpers import Gate, b64, gray_png, running, worker_of

pytestmark = pytest.mark.anyio

ADMIN = {"X-Admin-Key": "root"}
ONE = {"model": "pixelcnn", "images": [b64(gray_png(7))]}


async def wait_thread_event(event: threading.Event) -> None:
    assert await anyio.to_thread.run_sync(event.wait, 10), "event not set within 10 s"


@pytest.fixture
def store(model_dir: Path, tmp_path: Path) -> Path:
    """A model store of its own holding a copy of the tiny pixelcnn, for tests that change it."""
    shutil.copytree(model_dir / "pixelcnn", tmp_path / "pixelcnn")
    return tmp_path


def new_version(folder: Path, seed: int) -> str:
    """Replace the folder's checkpoint in place with freshly initialised weights; their sha256."""
    torch.manual_seed(seed)
    meta = save_checkpoint(PixelCNN(PixelCNNConfig(**TINY_PIXELCNN)), folder, dataset=dataset_meta())
    return str(meta["weights"]["sha256"])


def log_likelihood(folder: Path) -> float:
    """log p(x) of ONE's image under the folder's current weights, computed offline."""
    scorer, _ = load_scorer(folder, "cpu")
    x = np.array(Image.open(io.BytesIO(gray_png(7))))[None, None]  # (1, 1, 8, 8) uint8
    with torch.no_grad():
        return float(scorer.model.log_prob(torch.from_numpy(x)).double()[0])


async def settle(app: Any) -> None:
    """Until the retired versions have drained and closed."""
    await asyncio.gather(*list(app.state.lifecycle._draining))


async def test_admin_api_is_refused_without_the_admin_key(make_settings: Any) -> None:
    async with running(make_settings(models="pixelcnn", api_keys="client")) as (_, client):
        r = await client.post("/admin/models/pixelcnn/reload", headers={"X-API-Key": "client"})
        assert r.status_code == 403 and "GENSERVE_ADMIN_KEYS" in r.json()["detail"]
    async with running(make_settings(models="pixelcnn", api_keys="client", admin_keys="root")) as (_, client):
        for headers in ({}, {"X-Admin-Key": "client"}, {"Authorization": "Bearer client"}, {"X-Admin-Key": "roo"}):
            r = await client.post("/admin/models/pixelcnn/reload", headers=headers)
            assert r.status_code == 401 and "admin key" in r.json()["detail"]
        r = await client.post("/admin/models/pixelcnn/reload", headers={"Authorization": "Bearer root"})
        assert r.status_code == 200 and r.json()["result"] == "unchanged"


async def test_reload_swaps_to_the_new_version_and_names_it(store: Path, make_settings: Any) -> None:
    folder = store / "pixelcnn"
    old_sha, old_ll = read_metadata(folder)["weights"]["sha256"], log_likelihood(folder)
    async with running(make_settings(model_dir=store, admin_keys="root")) as (app, client):
        r = await client.post("/score", json=ONE)
        assert r.headers["X-Model-SHA256"] == old_sha and r.headers["X-Model-Version"] == "1"
        new_sha = new_version(folder, seed=1)
        new_ll = log_likelihood(folder)
        assert new_sha != old_sha and new_ll != pytest.approx(old_ll)
        r = await client.post("/admin/models/pixelcnn/reload", headers=ADMIN)
        assert r.status_code == 200, r.text
        assert r.json() | {"seconds": 0} == {"model": "pixelcnn", "action": "reload", "result": "reloaded",
                                             "version": 2, "sha256": new_sha, "previous_sha256": old_sha,
                                             "seconds": 0}  # fmt: skip
        r = await client.post("/score", json=ONE)
        assert r.headers["X-Model-SHA256"] == new_sha
        assert r.json()["results"][0]["log_likelihood_nats"] == pytest.approx(new_ll, rel=1e-5)
        info = (await client.get("/models/pixelcnn")).json()
        assert (info["version"], info["sha256"], info["last_reload_error"]) == (2, new_sha, None)
        await settle(app)
        m = app.state.metrics
        assert m.sample_value("genserve_model_reloads_total", {"model": "pixelcnn", "action": "reload",
                                                               "result": "ok"}) == 1  # fmt: skip
        assert m.sample_value("genserve_model_info", {"model": "pixelcnn", "kind": "autoregressive",
                                                      "architecture": "gated_pixelcnn", "sha256": old_sha,
                                                      "devices": "cpu"}) == 0  # fmt: skip


async def test_requests_during_a_reload_each_see_one_whole_version(store: Path, make_settings: Any) -> None:
    """Requests racing a reload get 200, answered entirely by the version their header names."""
    folder = store / "pixelcnn"
    expected = {read_metadata(folder)["weights"]["sha256"]: log_likelihood(folder)}
    async with running(make_settings(model_dir=store, admin_keys="root")) as (app, client):
        old_worker = worker_of(app, "pixelcnn")
        gate = Gate(old_worker.model, block=True)
        answers: list[Any] = []

        async def score() -> None:
            answers.append(await client.post("/score", json=ONE))

        async with anyio.create_task_group() as tg:
            tg.start_soon(score)  # in flight on the old version, held in its forward pass
            await wait_thread_event(gate.entered)
            new_sha = new_version(folder, seed=2)
            expected[new_sha] = log_likelihood(folder)
            r = await client.post("/admin/models/pixelcnn/reload", headers=ADMIN)
            assert r.status_code == 200, r.text
            for _ in range(4):
                tg.start_soon(score)
            assert old_worker.state is State.READY  # draining: the held request still runs there
            gate.release.set()
        await settle(app)
        assert old_worker.state is State.CLOSED
        assert [a.status_code for a in answers] == [200] * 5
        shas = [a.headers["X-Model-SHA256"] for a in answers]
        assert shas[0] != new_sha and shas.count(new_sha) == 4
        for a in answers:
            ll = a.json()["results"][0]["log_likelihood_nats"]
            assert ll == pytest.approx(expected[a.headers["X-Model-SHA256"]], rel=1e-5)


async def test_a_version_whose_weights_fail_the_sha256_check_is_refused(store: Path, make_settings: Any) -> None:
    folder = store / "pixelcnn"
    old_sha = read_metadata(folder)["weights"]["sha256"]
    async with running(make_settings(model_dir=store, admin_keys="root")) as (app, client):
        data = bytearray((folder / WEIGHTS).read_bytes())
        data[-1] ^= 0xFF  # one flipped bit in a weight: model.json's sha256 no longer matches
        (folder / WEIGHTS).write_bytes(bytes(data))
        r = await client.post("/admin/models/pixelcnn/reload", headers={**ADMIN}, params={"force": "true"})
        assert r.status_code == 409 and "sha256" in r.json()["detail"] and "serving version stays" in r.json()["detail"]
        r = await client.post("/score", json=ONE)
        assert r.status_code == 200 and r.headers["X-Model-SHA256"] == old_sha
        info = (await client.get("/models/pixelcnn")).json()
        assert info["version"] == 1 and "does not match" in info["last_reload_error"]
        m = app.state.metrics
        assert m.sample_value("genserve_model_reload_failed", {"model": "pixelcnn"}) == 1
        assert m.sample_value("genserve_model_reloads_total", {"model": "pixelcnn", "action": "reload",
                                                               "result": "refused"}) == 1  # fmt: skip


async def test_a_version_with_a_stale_calibration_is_refused(store: Path, make_settings: Any) -> None:
    folder = store / "pixelcnn"
    async with running(make_settings(model_dir=store, admin_keys="root")) as (_, client):
        update_metadata(folder, calibration={"weights_sha256": "0" * 64, "scores": {}})
        r = await client.post("/admin/models/pixelcnn/reload", headers=ADMIN)
        assert r.status_code == 409 and "stale" in r.json()["detail"]
        assert (await client.post("/score", json=ONE)).status_code == 200


async def test_unload_drains_requests_in_flight(store: Path, make_settings: Any) -> None:
    async with running(make_settings(model_dir=store, admin_keys="root")) as (app, client):
        worker = worker_of(app, "pixelcnn")
        gate = Gate(worker.model, block=True)
        answers: dict[str, Any] = {}

        async def score() -> None:
            answers["held"] = await client.post("/score", json=ONE)

        async def unload() -> None:
            answers["unload"] = await client.post("/admin/models/pixelcnn/unload", headers=ADMIN)

        async with anyio.create_task_group() as tg:
            tg.start_soon(score)
            await wait_thread_event(gate.entered)
            tg.start_soon(unload)
            while "pixelcnn" in app.state.registry.entries:  # the unload takes it out at once
                await asyncio.sleep(0)
            assert (await client.post("/score", json=ONE)).status_code == 404
            assert worker.state is State.READY and "unload" not in answers  # waiting for the held request
            gate.release.set()
        assert answers["held"].status_code == 200
        assert answers["unload"].status_code == 200 and answers["unload"].json()["result"] == "unloaded"
        assert worker.state is State.CLOSED
        r = await client.post("/admin/models/pixelcnn/load", headers=ADMIN)
        assert r.status_code == 200 and r.json()["result"] == "loaded"
        assert (await client.post("/score", json=ONE)).status_code == 200


async def test_the_watcher_reloads_a_changed_folder(store: Path, make_settings: Any) -> None:
    folder = store / "pixelcnn"
    async with running(make_settings(model_dir=store)) as (app, client):
        watcher = Watcher(app.state.lifecycle)
        assert await watcher.poll() == []
        new_sha = new_version(folder, seed=3)
        assert await watcher.poll() == ["pixelcnn"]
        r = await client.post("/score", json=ONE)
        assert r.headers["X-Model-SHA256"] == new_sha and r.headers["X-Model-Version"] == "2"
        assert await watcher.poll() == []
        await settle(app)


async def test_the_admin_routes_are_documented_only_where_enabled(make_settings: Any) -> None:
    async with running(make_settings(models="pixelcnn"), wait=False) as (_, client):
        assert not any(p.startswith("/admin") for p in (await client.get("/openapi.json")).json()["paths"])
    # (service/openapi.py documents security schemes only where GENSERVE_API_KEYS is set)
    async with running(make_settings(models="pixelcnn", api_keys="k", admin_keys="root"), wait=False) as (_, client):
        paths = (await client.get("/openapi.json")).json()["paths"]
    for action in ("load", "reload", "unload"):
        op = paths[f"/admin/models/{{name}}/{action}"]["post"]
        assert "security" in op and {"401", "403", "409"} <= set(op["responses"])


def test_serve_watch_flag_sets_the_poll_interval() -> None:
    from service.cli import build_parser

    assert build_parser().parse_args(["serve", "--watch"]).watch == 5.0
    assert build_parser().parse_args(["serve", "--watch", "2"]).watch == 2.0
    assert build_parser().parse_args(["serve"]).watch is None
