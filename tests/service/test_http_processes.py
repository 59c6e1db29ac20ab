"""Several HTTP processes in front of one model server per (model, device) (GENSERVE_HTTP_PROCESSES):
service/model_server.py and service/http_processes.py, against real spawned processes."""

from __future__ import annotations

import re
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from models.scoring.scorer import load_scorer
from service import scoring, wire
from service.http_processes import ModelServers
from service.jobs import SampleTask, ScoreTask
from service.model_process import ModelProcessDied, ModelProcessError
from service.registry import ModelRegistry
from service.settings import Settings
from service.shared_model import SharedModel
from tests.service import model_server_targets as targets
from tests.service.helpers import b64, gray_png
from tests.service.test_e2e import start_server, stop_server


@pytest.fixture
def servers(model_dir: Path) -> Iterator[ModelServers]:
    """The tiny PixelCNN's model server with faults (model_server_targets.faulty), in a short folder
    (a Unix socket's path has a length limit)."""
    folder = Path(tempfile.mkdtemp(prefix="gs-"))
    limits = ModelRegistry.batch_limits(Settings(model_dir=model_dir, warmup=False))
    ms = ModelServers(limits, folder, secrets.token_bytes(16), target=targets.faulty)
    ms.add("pixelcnn", model_dir / "pixelcnn", ["cpu"])
    ms.start()
    try:
        yield ms
    finally:
        ms.stop()
        shutil.rmtree(folder, ignore_errors=True)


def client(ms: ModelServers) -> SharedModel:
    s = ms.servers[0]
    c = SharedModel(name=s.name, folder=s.folder, device=s.device, limits=ms.limits, address=s.address)
    c.start()
    return c


def images(value: int | None, n: int, seed: int) -> torch.Tensor:
    """n 8x8 images: random levels (value None, never all 0 or 255), or every pixel ``value``."""
    if value is not None:
        return torch.full((n, 1, 8, 8), value, dtype=torch.uint8)
    return torch.randint(1, 255, (n, 1, 8, 8), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def score(c: SharedModel, x: torch.Tensor, *, delay: float = 0.0, backlog: int = 0) -> Any:
    time.sleep(delay)
    task = ScoreTask(x=x, y=None, score_type="nll", heatmap=False)
    (result,) = c.run(ScoreTask, [task], [lambda: False], backlog=backlog)
    return result


def expected_nll(model_dir: Path, x: torch.Tensor) -> torch.Tensor:
    scorer, _ = load_scorer(model_dir / "pixelcnn", "cpu")
    with torch.inference_mode():
        return scoring.compute(scorer, x, None, score_type="nll", heatmap=False)["log_prob"]


def test_batches_of_several_processes_share_a_pass_and_each_gets_its_own_results(servers, model_dir):
    clients = [client(servers) for _ in range(3)]
    xs = [images(None, n, seed) for seed, n in enumerate((1, 2, 3))]
    # The first pass runs (0.4 s) while the other two clients' batches arrive: those two share the next.
    with ThreadPoolExecutor(3) as ex:
        futures = [
            ex.submit(score, c, x, delay=0.0 if i == 0 else 0.15)
            for i, (c, x) in enumerate(zip(clients, xs, strict=True))
        ]
        results = [f.result(timeout=30) for f in futures]
    for x, got in zip(xs, results, strict=True):
        assert torch.allclose(got["log_prob"], expected_nll(model_dir, x), rtol=1e-5, atol=1e-4)
    assert clients[0].last_batches == 1
    assert clients[1].last_batches == clients[2].last_batches == 2


def test_processes_that_keep_sending_keep_sharing_passes(servers):
    """Each process sends its next batch a moment after its result (as an HTTP worker with images still
    queued does under load): the pass waits for the other process's, so the two never fall into
    alternating half passes."""
    a, b = client(servers), client(servers)

    def keep_sending(c: SharedModel, seed: int) -> list[int]:
        shared = []
        for i in range(4):
            # 0.02 s: the time to form its next batch; a backlog but for its last
            score(c, images(None, 2, seed=seed + i), delay=0.02, backlog=2 if i < 3 else 0)
            shared.append(c.last_batches)
        return shared

    with ThreadPoolExecutor(2) as ex:
        first = ex.submit(keep_sending, a, 0)
        time.sleep(0.15)  # b's first batch waits behind a's first pass
        second = ex.submit(keep_sending, b, 10)
        ran_a, ran_b = first.result(timeout=60), second.result(timeout=60)
    # a's first pass ran alone; b's last did, a having said it had nothing more (no wait for it).
    assert ran_a[1:] == [2, 2, 2] and ran_b[:3] == [2, 2, 2], (ran_a, ran_b)


def test_a_failing_batch_fails_only_its_sender_when_merged(servers, model_dir):
    first, culprit, bystander = (client(servers) for _ in range(3))
    clean = images(None, 2, seed=7)
    with ThreadPoolExecutor(3) as ex:
        ex.submit(score, first, images(None, 1, seed=1))
        bad = ex.submit(score, culprit, images(255, 1, seed=0), delay=0.15)
        good = ex.submit(score, bystander, clean, delay=0.15)
        with pytest.raises(ModelProcessError, match="breaks the model"):
            bad.result(timeout=30)
        got = good.result(timeout=30)
    assert torch.allclose(got["log_prob"], expected_nll(model_dir, clean), rtol=1e-5, atol=1e-4)
    assert bystander.last_batches == 1  # answered by the server's retry of its batch alone


def test_a_crashed_server_fails_its_pass_and_is_started_again(servers, model_dir):
    c, other = client(servers), client(servers)
    with pytest.raises(ModelProcessDied, match="retry"):
        score(c, images(0, 1, seed=0))
    x = images(None, 2, seed=3)
    for who in (c, other):  # each connects again, to the server the supervisor started again
        got = score(who, x)
        assert torch.allclose(got["log_prob"], expected_nll(model_dir, x), rtol=1e-5, atol=1e-4)
    assert c.restarts == 1 and not c.broken


def test_a_client_that_leaves_has_its_queued_batches_dropped(servers):
    busy, after = client(servers), client(servers)
    address = servers.servers[0].address
    with ThreadPoolExecutor(1) as ex:
        running = ex.submit(score, busy, images(None, 1, seed=1))
        time.sleep(0.15)
        leaving = Client(address.path, family="AF_UNIX", authkey=address.authkey)
        wire.recv(leaving)  # the model's hello
        header, tensors = wire.tasks_message([ScoreTask(x=images(None, 4, 2), y=None, score_type="nll", heatmap=True)])
        wire.send(leaving, {"type": "run", "id": 1, "alone": True, **header}, tensors)
        time.sleep(0.05)
        leaving.close()  # its HTTP process has gone with the batch queued
        running.result(timeout=30)
    start = time.perf_counter()
    score(after, images(None, 1, seed=3))
    assert time.perf_counter() - start < 1.8 * targets.PASS_S  # one pass: not behind the dropped batch's


def test_a_caller_who_leaves_stops_its_generation_in_the_shared_server(servers):
    c = client(servers)
    rows: list[int] = []
    task = SampleTask(n=2, seed=3, temperature=1.0, label=None, on_row=lambda done, images: rows.append(done))
    start = time.perf_counter()
    (result,) = c.run(SampleTask, [task], [lambda: len(rows) >= 1])  # the caller leaves after the first row
    assert result is None  # nobody waits for it
    assert len(rows) <= 3 < 8  # stopped within a row or two, not after all eight
    assert time.perf_counter() - start < 6 * targets.PASS_S


def test_a_client_without_the_key_is_not_heard(servers):
    address = servers.servers[0].address
    with pytest.raises((AuthenticationError, EOFError, ConnectionError)):
        Client(address.path, family="AF_UNIX", authkey=b"not the key")
    score(client(servers), images(None, 1, seed=4))  # the server still serves


# ---- the whole command ----------------------------------------------------------------------------


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.slow
def test_genserve_serve_with_two_http_processes(model_dir):
    proc, url, log = start_server(model_dir, GENSERVE_HTTP_PROCESSES="2", GENSERVE_WARMUP="false")
    try:
        pids = [int(p) for p in re.findall(r"ready \(pid (\d+)\)", "".join(log.lines))]
        assert len(pids) == 2  # one server per model on the one device
        body = {"model": "pixelcnn", "images": [b64(gray_png(seed=s)) for s in range(2)], "score_type": "nll"}
        with httpx.Client(timeout=60) as single:  # a single-process server's answers, for comparison
            for _ in range(60):
                if all(single.get(url + "/readyz").status_code == 200 for _ in range(4)):
                    break
                time.sleep(0.5)

        def one(_: int) -> Any:
            with httpx.Client(timeout=60) as h:  # a connection each: the kernel spreads them over the processes
                r = h.post(url + "/score", json=body)
                assert r.status_code == 200, r.text
                return [res["log_likelihood_nats"] for res in r.json()["results"]]

        with ThreadPoolExecutor(8) as ex:
            answers = list(ex.map(one, range(40)))
        assert all(a == answers[0] for a in answers)
        with httpx.Client(timeout=60) as h:
            metrics = h.get(url + "/metrics").text
        # Summed over both HTTP processes, whichever answers the scrape.
        assert metric(metrics, "genserve_requests_total", route="/score", status="200") == 40
        bad = httpx.post(url + "/score", json={**body, "model": "nope"}, timeout=30)
        assert bad.status_code == 404 and "available" in bad.json()["detail"]
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        stop_server(proc, log)
    assert code == 0
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), "a model server outlived the service"


@pytest.mark.parametrize("other", [{"admin_keys": "k"}, {"watch_interval_s": 5.0}])
def test_several_http_processes_refuse_settings_that_reload_models(model_dir, other):
    with pytest.raises(ValueError, match="GENSERVE_HTTP_PROCESSES=2 cannot be used with"):
        Settings(model_dir=model_dir, http_processes=2, **other)
    Settings(model_dir=model_dir, http_processes=1, **other)  # one process: fine
