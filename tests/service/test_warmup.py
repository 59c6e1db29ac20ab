"""The warm-up sweep that picks each worker's pass size (service/warmup.py)."""

from __future__ import annotations

import pytest

from service.warmup import best_size, sweep, sweep_sizes, time_sizes
from tests.service.helpers import Gate, b64, gray_png, running

pytestmark = pytest.mark.anyio


class FakeClock:
    """A clock that only moves when a pass runs: pass n costs cost(n) seconds."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_sizes_are_powers_of_two_up_to_the_limit():
    assert sweep_sizes(1) == [1]
    assert sweep_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert sweep_sizes(24) == [1, 2, 4, 8, 16, 24]
    with pytest.raises(ValueError, match="at least 1"):
        sweep_sizes(0)


def test_best_size_is_the_smallest_within_tolerance_of_the_fastest_per_image():
    # per image: 10, 6, 4.1, 4.0 (fastest), 4.5 ms
    seconds = {1: 0.010, 2: 0.012, 4: 0.0164, 8: 0.032, 16: 0.072}
    assert best_size(seconds) == 4  # 4.1 is within 5% of 4.0
    assert best_size(seconds, tolerance=0.0) == 8
    # a GPU-like curve: ever cheaper per image, the largest wins
    assert best_size({1: 1e-3, 2: 1.1e-3, 4: 1.2e-3, 8: 1.3e-3}) == 8
    with pytest.raises(ValueError):
        best_size({})


def test_the_sweep_keeps_each_sizes_best_time_and_finds_the_cheapest_size():
    clock = FakeClock()
    ran: list[int] = []
    slow_once = {16}  # the first pass of 16 meets a burst of load elsewhere

    def run(n: int) -> None:
        ran.append(n)
        per_image = {1: 10.0, 2: 6.0, 4: 5.0, 8: 3.0, 16: 2.9, 32: 4.0}[n] / 1000
        clock.now += n * per_image * (5.0 if n in slow_once else 1.0)
        slow_once.discard(n)

    seconds = time_sizes(run, sweep_sizes(32), rounds=3, budget_s=100.0, clock=clock)
    assert ran == [1, 2, 4, 8, 16, 32] * 3  # round-robin, every size in every round
    assert seconds[16] == pytest.approx(16 * 2.9 / 1000)  # the slow pass did not count
    assert best_size(seconds) == 8  # 3.0 is within 5% of 2.9: the smaller size


def test_the_budget_stops_further_rounds_but_times_every_size_once():
    clock = FakeClock()
    ran: list[int] = []

    def run(n: int) -> None:
        ran.append(n)
        clock.now += 1.0

    seconds = time_sizes(run, [1, 2, 4], rounds=3, budget_s=2.5, clock=clock)
    assert ran == [1, 2, 4]  # the first round took 3 s > 2.5 s
    assert set(seconds) == {1, 2, 4}


def test_sweep_runs_real_passes():
    passes: list[int] = []
    size, seconds = sweep(passes.append, 8, rounds=1)
    assert passes == [1, 2, 4, 8]
    assert size in seconds


async def test_a_worker_reports_its_swept_pass_size_and_never_exceeds_it(make_settings):
    async with running(make_settings(batch_sweep=True, max_batch_size=16)) as (app, client):
        info = (await client.get("/models/pixelcnn")).json()
        (size,) = info["pass_sizes"]
        assert size in sweep_sizes(16)
        worker = app.state.registry.entries["pixelcnn"].workers[0]
        gate = Gate(worker.model)
        images = [b64(gray_png(i)) for i in range(20)]
        r = await client.post("/score", json={"model": "pixelcnn", "images": images, "score_type": "nll"})
        assert r.status_code == 200, r.text
        assert len(r.json()["results"]) == 20
        assert gate.calls and max(gate.calls) <= size and sum(gate.calls) == 20


async def test_without_the_sweep_the_pass_size_is_max_batch_size(make_settings):
    async with running(make_settings(batch_sweep=False, max_batch_size=16)) as (_, client):
        info = (await client.get("/models/pixelcnn")).json()
        assert info["pass_sizes"] == [16]
