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


def seconds_of(ms_per_image: dict[int, list[float]]) -> dict[int, list[float]]:
    return {n: [n * t / 1000 for t in ts] for n, ts in ms_per_image.items()}


def test_the_largest_size_stays_unless_a_smaller_one_is_clearly_and_always_faster():
    # ms per image in three rounds: 8 is 25% faster than 32 in every round, 16 12.5%
    ms = {1: [10, 10, 10], 2: [6, 6, 6], 4: [4, 4, 4], 8: [3, 3.1, 2.9], 16: [3.5, 3.6, 3.4], 32: [4, 4, 4]}
    assert best_size(seconds_of(ms)) == 8
    assert best_size(seconds_of(ms), margin=0.2) == 8
    assert best_size(seconds_of(ms), margin=0.3) == 32  # nothing is 30% faster
    # 8 is faster in the median but slower than 32 in one round: not evidence enough, 16 is
    ms[8] = [3, 3, 4.5]
    assert best_size(seconds_of(ms)) == 16
    assert best_size(seconds_of(ms), margin=0.2) == 32
    # a GPU-like curve: ever cheaper per image, the largest wins
    assert best_size(seconds_of({1: [1.0], 2: [0.6], 4: [0.4], 8: [0.3]})) == 8
    with pytest.raises(ValueError):
        best_size({})


def test_the_sweep_times_every_size_every_round_round_robin():
    clock = FakeClock()
    ran: list[int] = []
    slow_once = {16}  # the first pass of 16 meets a burst of load elsewhere

    def run(n: int) -> None:
        ran.append(n)
        per_image = {1: 10.0, 2: 6.0, 4: 5.0, 8: 3.0, 16: 2.9, 32: 4.0}[n] / 1000
        clock.now += n * per_image * (5.0 if n in slow_once else 1.0)
        slow_once.discard(n)

    seconds = time_sizes(run, sweep_sizes(32), rounds=3, budget_s=100.0, clock=clock)
    assert ran == [1, 2, 4, 8, 16, 32] * 3
    assert seconds[16] == pytest.approx([16 * 2.9 * 5 / 1000, 16 * 2.9 / 1000, 16 * 2.9 / 1000])
    assert best_size(seconds) == 8  # 16 was slower than 32 in its first round; 8 is faster every time


def test_the_budget_stops_further_rounds_after_the_minimum():
    clock = FakeClock()
    ran: list[int] = []

    def run(n: int) -> None:
        ran.append(n)
        clock.now += 1.0

    seconds = time_sizes(run, [1, 2, 4], rounds=4, min_rounds=2, budget_s=2.5, clock=clock)
    assert ran == [1, 2, 4] * 2  # two rounds whatever the budget, then none: 6 s > 2.5 s
    assert seconds == {1: [1.0, 1.0], 2: [1.0, 1.0], 4: [1.0, 1.0]}


def test_sweep_runs_real_passes():
    passes: list[int] = []
    size, seconds = sweep(passes.append, 8, rounds=1)
    assert passes == [1, 2, 4, 8] and all(len(t) == 1 for t in seconds.values())
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
