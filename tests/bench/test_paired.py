"""bench/paired.py: the peer bench's paired phases (both servers up, the idle one frozen)."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import paired  # noqa: E402
from proc_cpu import descendants  # noqa: E402

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux's /proc")


def coverage(n: int, k: int) -> float:
    return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n


@pytest.mark.parametrize("n", [1, 2, 5, 6, 10, 12, 20, 40])
def test_the_interval_is_the_narrowest_order_statistic_one_that_keeps_the_coverage(n: int) -> None:
    values = [float(v) for v in range(n, 0, -1)]  # unsorted on purpose
    med, lo, hi, cov = paired.median_interval(values)
    assert med == (n + 1) / 2
    k = int(lo)  # the values are 1..n, so x_(k) = k
    assert hi == n + 1 - k and cov == pytest.approx(coverage(n, k))
    if n >= 6:  # enough values for 95%: that coverage holds, and one step inwards it would not
        assert cov >= 0.95 and (k + 1 > (n + 1) // 2 or coverage(n, k + 1) < 0.95)
    else:  # too few: the whole range, with what it covers
        assert (lo, hi) == (1, n)
    with pytest.raises(ValueError):
        paired.median_interval([])


def phase(rate: float, cpu: float | None = 2.0, errors: int = 0, idle: float | None = 0.1) -> dict[str, Any]:
    return {"images_per_s": rate, "requests": 10, "errors": errors, "cpu_ms_per_request": cpu, "machine_idle": idle}


def test_pairs_are_summarised_by_the_median_of_their_ratios() -> None:
    rows = [
        {"a": phase(10, 4), "b": phase(5, 6)},  # 2.0, CPU 1.5
        {"a": phase(12, 4), "b": phase(12, 4)},  # 1.0, CPU 1.0
        {"a": phase(9, 2, errors=1, idle=0.3), "b": phase(6, 6)},  # 1.5, CPU 3.0
    ]
    s = paired.summarise_pairs({32: rows, 1: [{"a": phase(3, None), "b": phase(2)}]}, "a", "b")
    e = s["32"]
    assert (e["a"], e["b"], e["ratio"], e["ratio_low"], e["ratio_high"]) == (10, 6, 1.5, 1.0, 2.0)
    assert (e["cpu_ratio"], e["a_cpu_ms"], e["b_cpu_ms"], e["errors"]) == (1.5, 4, 6, 1)
    assert s["1"]["ratio"] == 1.5 and "cpu_ratio" not in s["1"]  # a phase without CPU figures: no CPU ratio
    assert e["a_idle"] == 0.1 and e["b_idle"] == 0.1
    result = {"pairs": 3, "seconds": 5, "warm_seconds": 1, "client": "hey"}
    text = paired.pairs_table(result | {"models": [{"model": "m", "inprocess_32": 20.0, "clients": {"32": e}}]},
                              "a", "b", ("A", "B"))  # fmt: skip
    row = "| m | 32 | 10.0 | 6.0 | 1.50 | 1.00 to 2.00 (75%) | 4.00 | 6.00 | 1.50 | 1.00 to 3.00 | 10% / 10% | 20.0 |"
    assert row + " 0.50 | 1 |" in text and "ratio = A / B" in text


def state(pid: int) -> str:
    return (Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()[0]


def test_a_frozen_server_and_its_children_are_stopped_until_thawed_and_phases_alternate() -> None:
    # a parent that starts a child, like LitServe's server and its worker
    child = "import time; time.sleep(60)"
    code = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(60)"
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(2)]
    try:
        deadline = time.monotonic() + 10
        while any(len(descendants(p.pid)) < 2 for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)  # the children are on their way
        pids = {"a": procs[0].pid, "b": procs[1].pid}
        for pid in pids.values():
            paired.freeze(pid)
        assert {state(p) for pid in pids.values() for p in descendants(pid)} == {"T"}
        seen: list[tuple[str, int, float, set[str], set[str]]] = []

        def loader(name: str) -> Any:
            def load(clients: int, seconds: float) -> dict[str, Any]:
                other = pids["b" if name == "a" else "a"]
                mine = {state(p) for p in descendants(pids[name])}
                seen.append((name, clients, seconds, mine, {state(p) for p in descendants(other)}))
                return phase(10.0 if name == "a" else 5.0)

            return load

        got = paired.run_pairs(pids, {"a": loader("a"), "b": loader("b")}, clients=(1, 32), pairs=3, seconds=0.2,
                               warm_seconds=0.1)  # fmt: skip
        # each phase: a warm-up then the measured load, the loaded server running, the other frozen
        assert [(n, c, s) for n, c, s, _, _ in seen[:4]] == [("a", 1, 0.1), ("a", 1, 0.2), ("b", 1, 0.1), ("b", 1, 0.2)]
        assert [n for n, _, s, _, _ in seen if s == 0.2] == ["a", "b", "b", "a", "a", "b"] * 2  # order alternates
        assert all("T" not in mine and other == {"T"} for _, _, _, mine, other in seen)
        assert [len(got[c]) for c in (1, 32)] == [3, 3] and got[32][1]["b"]["images_per_s"] == 5.0
        assert {state(p) for pid in pids.values() for p in descendants(pid)} == {"T"}  # left frozen
        ticks = paired.machine_ticks()
        assert ticks is not None and 0 <= ticks[0] <= ticks[1]
        time.sleep(0.05)
        idle = paired.idle_fraction(ticks, paired.machine_ticks())
        assert idle is not None and 0 <= idle <= 1 and paired.idle_fraction(ticks, ticks) is None
        paired.thaw(pids["a"])
        assert "T" not in {state(p) for p in descendants(pids["a"])}
    finally:
        for p in procs:
            for pid in reversed(descendants(p.pid)):
                paired.thaw(pid)
                subprocess.run(["kill", "-9", str(pid)], check=False)
            p.wait()
