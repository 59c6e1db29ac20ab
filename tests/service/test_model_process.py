"""GENSERVE_MODEL_PROCESS: each worker's model in a process of its own (service/model_process.py),
fed through service/wire.py's pickle-free messages."""

from __future__ import annotations

import asyncio
import os
from multiprocessing import Pipe
from typing import Any

import numpy as np
import pytest
import torch

import service.model_process
from service import wire
from service.jobs import EncodeTask, SampleResult, SampleTask, ScoreTask
from tests.service import model_process_targets as targets
from tests.service.helpers import b64, gray_png, png_bytes, running

pytestmark = pytest.mark.anyio

WHITE = b64(png_bytes(np.full((8, 8), 255, dtype=np.uint8)))


def body(*images: str, model: str = "pixelcnn", score_type: str = "nll") -> dict[str, Any]:
    return {"model": model, "images": list(images), "score_type": score_type}


def worker_of(app: Any, name: str) -> Any:
    return app.state.registry.entries[name].workers[0]


# ---- the wire format ----------------------------------------------------------------------------


def test_tasks_and_results_cross_the_pipe_unchanged():
    a, b = Pipe()
    x = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    tasks = [
        ScoreTask(x=x, y=None, score_type="nll", heatmap=True),
        ScoreTask(x=x[:1], y=torch.tensor([2]), score_type="dose", heatmap=False),
    ]
    wire.send(a, *wire.tasks_message(tasks))
    task_type, got = wire.tasks_from(*wire.recv(b))
    assert task_type is ScoreTask and len(got) == 2
    assert torch.equal(got[0].x, x) and got[0].y is None and got[0].heatmap is True
    assert torch.equal(got[1].y, torch.tensor([2])) and got[1].score_type == "dose"

    sample = [SampleTask(n=2, seed=5, temperature=0.5, label=None, on_row=lambda r, im: None)]
    wire.send(a, *wire.tasks_message(sample))
    task_type, got = wire.tasks_from(*wire.recv(b))
    assert task_type is SampleTask and got[0].on_row is True and got[0].temperature == 0.5  # a flag: rows wanted

    results = [
        {"nll": torch.tensor([1.5, 2.5], dtype=torch.float64), "pix": torch.zeros(2, 1, 8, 8)},
        SampleResult(images=x[:2], log_prob=None),
        None,
        SampleResult(images=x[:1], log_prob=torch.tensor([-3.0])),
    ]
    wire.send(a, *wire.results_message(results))
    back = wire.results_from(*wire.recv(b))
    assert torch.equal(back[0]["nll"], results[0]["nll"]) and back[0]["nll"].dtype == torch.float64
    assert torch.equal(back[1].images, x[:2]) and back[1].log_prob is None and back[2] is None
    assert torch.equal(back[3].log_prob, torch.tensor([-3.0]))


def test_the_wire_refuses_what_it_cannot_carry():
    a, b = Pipe()
    with pytest.raises(wire.WireError, match="complex64"):
        wire.send(a, {"type": "x"}, {"t": torch.zeros(2, dtype=torch.complex64)})

    def frame(header: bytes, payload: bytes = b"") -> bytes:
        return len(header).to_bytes(4, "big") + header + payload

    a.send_bytes(frame(b'{"type": "run", "tensors": [{"name": "t", "dtype": "object", "shape": [1]}]}'))
    with pytest.raises(wire.WireError, match="unknown tensor dtype"):
        wire.recv(b)
    four_floats = b'{"type": "run", "tensors": [{"name": "t", "dtype": "torch.float32", "shape": [4]}]}'
    a.send_bytes(frame(four_floats, b"x" * 8))  # 8 of its 16 bytes
    with pytest.raises(wire.WireError, match="runs past the end"):
        wire.recv(b)
    a.send_bytes(frame(b'{"type": "run", "tensors": []}', b"extra"))
    with pytest.raises(wire.WireError, match="5 bytes after"):
        wire.recv(b)
    with pytest.raises(wire.WireError, match="unknown task op"):
        wire.tasks_from({"op": "format-disk", "tasks": []}, {})
    with pytest.raises(wire.WireError, match="cannot cross"):
        wire.tasks_message([EncodeTask(x=[1, 2])])  # type: ignore[arg-type]


# ---- served through model processes ------------------------------------------------------------


async def test_scores_samples_and_codes_equal_the_thread_workers(make_settings):
    images = [b64(gray_png(seed=i)) for i in range(3)]
    requests = [
        ("/score", body(*images)),
        ("/score", {**body(*images, score_type="complexity"), "heatmap": True}),
        ("/score", {**body(*images, model="pixelcnn-cond"), "label": "b"}),
        ("/score", body(*images, model="vae", score_type="complexity")),
        ("/sample", {"model": "pixelcnn", "n": 3, "seed": 11}),
        ("/sample", {"model": "pixelcnn-cond", "n": 2, "seed": 4, "label": "c"}),
        ("/encode", {"model": "vae", "images": images}),
    ]
    answers = []
    for split in (False, True):
        async with running(make_settings(model_process=split)) as (app, client):
            got = []
            for path, req in requests:
                r = await client.post(path, json=req)
                assert r.status_code == 200, (path, r.text)
                got.append({k: v for k, v in r.json().items() if k not in ("request_id", "elapsed_ms")})
            answers.append(got)
            worker = worker_of(app, "pixelcnn")
            assert (worker.process is not None) == split
            if split:
                processes = [w.process for w in app.state.registry.workers]
                assert all(p.alive and p.pid != os.getpid() for p in processes)
                assert worker.weights_sha256 == app.state.registry.entries["pixelcnn"].sha256
        if split:  # the lifespan's end stopped every model process
            assert not any(p.alive for p in processes)
    assert answers[0] == answers[1]


async def test_requests_that_queue_share_one_pass_in_the_model_process(make_settings, monkeypatch):
    monkeypatch.setattr(service.model_process, "serve", targets.slow_first_pass)
    async with running(make_settings(models="pixelcnn", model_process=True)) as (_, client):
        rs = await asyncio.gather(*(client.post("/score", json=body(b64(gray_png(seed=i)))) for i in range(12)))
        assert all(r.status_code == 200 for r in rs)
        metrics = (await client.get("/metrics")).text
        lines = [ln for ln in metrics.splitlines() if 'model="pixelcnn"' in ln and 'op="score"' in ln]
        count = [ln for ln in lines if ln.startswith("genserve_batch_images_count")]
        total = [ln for ln in lines if ln.startswith("genserve_batch_images_sum")]
        assert float(total[0].split()[-1]) == 12
        # one pass, or the first request's and then the ones that queued behind it (in at most two)
        assert float(count[0].split()[-1]) <= 3


async def test_each_pass_runs_on_its_share_of_the_cores(make_settings, monkeypatch, tmp_path):
    log = tmp_path / "threads.log"
    monkeypatch.setenv(targets.THREADS_LOG, str(log))  # spawned processes inherit it
    monkeypatch.setattr(service.model_process, "serve", targets.record_threads)
    settings = make_settings(models="pixelcnn", devices="cpu,cpu", model_process=True, torch_threads=2)
    async with running(settings) as (_, client):
        held = asyncio.ensure_future(client.post("/score", json=body(WHITE)))
        for _ in range(500):  # until the held pass has started (on worker 0: of equal loads, the first)
            if log.exists() and log.read_text():
                break
            await asyncio.sleep(0.01)
        beside = await client.post("/score", json=body(b64(gray_png())))  # the idle worker, beside it
        assert beside.status_code == 200 and (await held).status_code == 200
        alone = await client.post("/score", json=body(b64(gray_png(seed=1))))  # worker 0 again, alone
        assert alone.status_code == 200
    passes = [tuple(map(int, line.split())) for line in log.read_text().splitlines()]
    assert [threads for _, threads in passes] == [2, 1, 2]
    assert passes[0][0] == passes[2][0] != passes[1][0]  # two model processes; light load keeps to the first


async def test_by_default_a_lone_model_on_two_cores_gets_a_second_worker_in_a_model_process(make_settings, monkeypatch):
    monkeypatch.setattr("service.settings.usable_cores", lambda: 2)
    settings = make_settings(models="vae", workers_per_device="auto", model_process="auto")
    async with running(settings) as (app, client):
        first, second = app.state.registry.entries["vae"].workers
        assert (first.device, second.device) == ("cpu", "cpu")
        assert first.process is None and first.model is not None  # the HTTP process's thread: no pipe
        assert second.process is not None and second.process.alive and second.model is None
        assert first.cores is second.cores is app.state.registry.cores
        assert (await client.get("/models/vae")).json()["devices"] == ["cpu", "cpu"]
        rs = await asyncio.gather(
            *(client.post("/score", json=body(b64(gray_png(seed=i)), model="vae")) for i in range(8))
        )
        assert all(r.status_code == 200 for r in rs)


async def test_a_failing_request_fails_alone(make_settings, monkeypatch):
    monkeypatch.setattr(service.model_process, "serve", targets.raise_on_poison)
    async with running(make_settings(models="pixelcnn", model_process=True)) as (app, client):
        good = [client.post("/score", json=body(b64(gray_png(seed=i)))) for i in range(4)]
        rs = await asyncio.gather(client.post("/score", json=body(WHITE)), *good)
        assert rs[0].status_code == 500 and "request_id" in rs[0].json()
        assert "breaks the model" not in rs[0].text  # the error stays in the log
        assert [r.status_code for r in rs[1:]] == [200] * 4
        assert worker_of(app, "pixelcnn").process.restarts == 0


async def test_a_crashed_model_process_fails_its_pass_and_the_next_starts_a_new_one(make_settings, monkeypatch):
    monkeypatch.setattr(service.model_process, "serve", targets.crash_on_poison)
    async with running(make_settings(models="pixelcnn", model_process=True)) as (app, client):
        worker = worker_of(app, "pixelcnn")
        first_pid = worker.process.pid
        good = [client.post("/score", json=body(b64(gray_png(seed=i)))) for i in range(3)]
        rs = await asyncio.gather(client.post("/score", json=body(WHITE)), *good)
        assert rs[0].status_code == 503 and "retry" in rs[0].json()["detail"]
        assert [r.status_code for r in rs[1:]] == [200] * 3  # bystanders ran again, alone, on a new process
        r = await client.post("/score", json=body(b64(gray_png(seed=9))))
        assert r.status_code == 200
        assert worker.process.pid != first_pid and worker.process.restarts >= 1
        assert (await client.get("/readyz")).status_code == 200


async def test_a_model_process_that_cannot_load_fails_its_worker(make_settings, monkeypatch):
    monkeypatch.setattr(service.model_process, "serve", targets.never_ready)
    async with running(make_settings(models="pixelcnn", model_process=True)) as (app, client):
        worker = worker_of(app, "pixelcnn")
        assert worker.state.value == "failed" and "missing" in worker.error
        r = await client.post("/score", json=body(b64(gray_png())))
        assert r.status_code == 503


async def test_a_caller_who_leaves_stops_the_generation_in_the_model_process(make_settings, monkeypatch):
    monkeypatch.setattr(service.model_process, "serve", targets.slow_rows)
    async with running(make_settings(models="pixelcnn", model_process=True)) as (app, client):
        registry = app.state.registry
        entry = registry.entries["pixelcnn"]
        rows: list[int] = []
        first = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_row(done: int, images: torch.Tensor) -> None:  # on the worker's thread
            rows.append(done)
            loop.call_soon_threadsafe(first.set)

        call = asyncio.create_task(registry.sample(entry, n=2, seed=3, temperature=1.0, label=None, on_row=on_row))
        await asyncio.wait_for(first.wait(), 30)
        call.cancel()  # the caller leaves after the first row
        with pytest.raises(asyncio.CancelledError):
            await call
        r = await client.post("/sample", json={"model": "pixelcnn", "n": 1, "seed": 1})
        assert r.status_code == 200  # ran after the cancelled generation stopped
        assert len(rows) <= 3 < 8  # it left within a row or two of the cancellation


async def test_the_setting_names_the_models_that_get_a_process(make_settings):
    async with running(make_settings(models="pixelcnn,vae", model_process="vae")) as (app, client):
        assert worker_of(app, "vae").process is not None and worker_of(app, "vae").process.alive
        assert worker_of(app, "pixelcnn").process is None  # on a thread of the HTTP process, as by default
        for model in ("pixelcnn", "vae"):
            assert (await client.post("/score", json=body(b64(gray_png()), model=model))).status_code == 200
    for text, expected in (("true", True), ("1", True), ("false", False), ("", False), ("vae", False)):
        assert make_settings(model_process=text).model_process_for("pixelcnn") is expected, text
    assert make_settings(model_process=" pixelcnn, vae ").model_process_names == ["pixelcnn", "vae"]


async def test_a_model_process_setting_that_names_no_served_model_stops_startup(make_settings):
    from service.registry import RegistryError

    with pytest.raises(RegistryError, match=r"GENSERVE_MODEL_PROCESS names \['vea'\], not models served here"):
        async with running(make_settings(models="pixelcnn,vae", model_process="vae,vea")):
            pass


async def test_auto_gives_a_process_to_models_that_step_through_python(make_settings, tmp_path):
    import shutil

    from models.checkpoint import save_checkpoint
    from models.pixelrnn import PixelRNN, PixelRNNConfig
    from tests.helpers import dataset_meta

    assert PixelRNN.steps_in_python and not PixelRNN.__mro__[1].steps_in_python
    tiny = {"height": 8, "width": 8, "hidden": 6, "n_layers": 2, "input_kernel": 3, "state_kernel": 3, "out_hidden": 8}
    save_checkpoint(PixelRNN(PixelRNNConfig(**tiny)), tmp_path / "rnn", dataset=dataset_meta())
    shutil.copytree(make_settings().model_dir / "pixelcnn", tmp_path / "pixelcnn")
    async with running(make_settings(model_dir=tmp_path, models="", model_process="auto")) as (app, client):
        assert worker_of(app, "rnn").process is not None and worker_of(app, "rnn").process.alive
        assert worker_of(app, "pixelcnn").process is None
        r = await client.post("/sample", json={"model": "rnn", "n": 2, "seed": 5})
        assert r.status_code == 200 and len(r.json()["images"]) == 2
    from service.settings import Settings

    assert Settings.model_fields["model_process"].default == "auto"


def test_stop_kills_a_model_process_that_does_not_end_in_time(model_dir):
    from service.loading import BatchLimits
    from service.model_process import ModelProcess

    limits = BatchLimits(max_batch_size=4, max_batch_wait_s=0.0, max_queue=8, max_concurrent_samples=1)
    proc = ModelProcess(name="pixelcnn", folder=model_dir / "pixelcnn", device="cpu", limits=limits,
                        target=targets.deaf)  # fmt: skip
    proc.start()
    pid = proc.pid
    assert pid is not None and proc.alive
    proc.stop(timeout=0.3)  # "stop" is ignored, and so is SIGTERM: killed
    assert not proc.alive
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
