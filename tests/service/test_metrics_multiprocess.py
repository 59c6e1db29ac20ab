"""/metrics with several HTTP processes (service/metrics.py): prometheus_client's multiprocess mode.

prometheus_client picks its value class when it is imported, from PROMETHEUS_MULTIPROC_DIR, so the processes
are fresh interpreters run with the variable set; the test process itself stays in the single-process mode.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import Metrics, mark_process_dead, multiprocess_dir

ROOT = Path(__file__).resolve().parents[2]
INFO = {"model": "m", "kind": "autoregressive", "architecture": "pixelcnn", "devices": "cpu"}
ROUTE = {"route": "/score", "model": "m", "status": "200"}
WORKER = {"model": "m", "device": "cpu", "worker": "0"}

# One HTTP process: its requests, in flight requests, queue, model info, reload result and drift window.
# Process "a" served version "old" and reloaded to "new" (old's info and drift window removed, as
# service/registry.py and service/drift_monitor.py do); process "b" served "new" only.
WRITER = """
import json, sys
from service.metrics import Metrics
who, requests, in_flight, queued, failed = sys.argv[1], *map(int, sys.argv[2:])
m = Metrics()
route = {"route": "/score", "model": "m", "status": "200"}
for _ in range(requests):
    m.requests.labels(**route).inc()
    m.request_seconds.labels(**route).observe(0.02)
m.in_flight.inc(in_flight)
m.queue_images.labels(model="m", device="cpu", worker="0").set(queued)
m.model_reload_failed.labels(model="m").set(failed)
def info(sha256):
    return "m", "autoregressive", "pixelcnn", sha256, "cpu"
if who == "a":
    m.model_info.labels(*info("old")).set(1)
    m.drift_uploads.labels(model="m").set(40)
    m.model_info.remove(*info("old"))
    m.drift_uploads.remove("m")
m.model_info.labels(*info("new")).set(1)
m.drift_uploads.labels(model="m").set(requests)
print("ready", flush=True)
sys.stdin.readline()  # alive until the test lets it end
"""

# Another HTTP process answering the scrape: the aggregate, then again after process a has ended, then
# with an empty folder.
SCRAPER = """
import json, pathlib, sys
from service.metrics import Metrics, mark_process_dead, multiprocess_dir
m = Metrics()
out = {"both": m.render([]).decode()}
mark_process_dead(int(sys.argv[1]))
out["b"] = m.render([]).decode()
print(json.dumps(out))
"""

# Once both writers have ended without being marked dead (uvicorn replaced them), then with an empty folder.
ENDED = """
import json
from service.metrics import Metrics, multiprocess_dir
m = Metrics()
out = {"ended": m.render([]).decode()}
for f in multiprocess_dir().glob("*.db"):
    f.unlink()
out["empty"] = m.render([]).decode()
print(json.dumps(out))
"""


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition: (name, labels) -> value."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    return samples(text).get((name, frozenset((labels or {}).items())))


def python(script: str, *args: object, folder: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
        env=env,
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(*procs: subprocess.Popen[str]) -> list[str]:
    """Each process's stdout, once all have ended, every one successfully."""
    ends = [proc.communicate(timeout=60) for proc in procs]
    for proc, (_, err) in zip(procs, ends, strict=True):
        assert proc.returncode == 0, err
    return [out for out, _ in ends]


@pytest.fixture(scope="module")
def scrapes(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], int, int]:
    """The scraper's three renders, and the pids of processes a and b."""
    folder = tmp_path_factory.mktemp("prometheus")
    a = python(WRITER, "a", 2, 1, 3, 1, folder=folder)
    b = python(WRITER, "b", 3, 4, 5, 0, folder=folder)
    for writer in (a, b):
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
    (out,) = finish(python(SCRAPER, a.pid, folder=folder))
    finish(a, b)  # they end
    (ended,) = finish(python(ENDED, folder=folder))
    return {**json.loads(out), **json.loads(ended)}, a.pid, b.pid


def test_counters_and_histograms_sum_over_processes(scrapes: tuple[dict[str, str], int, int]) -> None:
    both = scrapes[0]["both"]
    assert value(both, "genserve_requests_total", ROUTE) == 5
    assert value(both, "genserve_request_seconds_count", ROUTE) == 5
    assert value(both, "genserve_request_seconds_sum", ROUTE) == pytest.approx(0.1)
    assert value(both, "genserve_request_seconds_bucket", {**ROUTE, "le": "0.025"}) == 5
    assert value(both, "genserve_request_seconds_bucket", {**ROUTE, "le": "0.01"}) == 0
    # What a process did stays counted after it ends.
    assert value(scrapes[0]["b"], "genserve_requests_total", ROUTE) == 5


def test_live_gauges_sum_over_live_processes(scrapes: tuple[dict[str, str], int, int]) -> None:
    renders = scrapes[0]
    assert value(renders["both"], "genserve_in_flight_requests") == 1 + 4
    assert value(renders["both"], "genserve_queue_images", WORKER) == 3 + 5
    assert value(renders["b"], "genserve_in_flight_requests") == 4  # a ended: its requests are gone
    assert value(renders["b"], "genserve_queue_images", WORKER) == 5


def test_model_info_is_one_per_version_served_by_a_live_process(scrapes: tuple[dict[str, str], int, int]) -> None:
    renders = scrapes[0]
    for render in (renders["both"], renders["b"]):
        info = {labels: v for (name, labels), v in samples(render).items() if name == "genserve_model_info"}
        assert info == {frozenset({**INFO, "sha256": "new"}.items()): 1.0}  # not 2; "old" was removed
    assert value(renders["both"], "genserve_model_reload_failed", {"model": "m"}) == 1  # a's reload failed
    assert value(renders["b"], "genserve_model_reload_failed", {"model": "m"}) == 0


def test_drift_windows_are_shown_per_live_process(scrapes: tuple[dict[str, str], int, int]) -> None:
    renders, a, b = scrapes
    uploads = {
        dict(labels)["pid"]: v
        for (name, labels), v in samples(renders["both"]).items()
        if name == "genserve_drift_window_uploads"
    }
    assert uploads == {str(a): 2, str(b): 3}  # a's reset window (40) removed
    assert value(renders["b"], "genserve_drift_window_uploads", {"model": "m", "pid": str(a)}) is None


def test_the_live_gauges_of_processes_that_ended_unmarked_are_dropped(
    scrapes: tuple[dict[str, str], int, int],
) -> None:
    ended = scrapes[0]["ended"]
    assert value(ended, "genserve_in_flight_requests") == 0  # the scraper's own; the writers' 1 + 4 gone
    assert value(ended, "genserve_queue_images", WORKER) is None
    assert value(ended, "genserve_requests_total", ROUTE) == 5  # what they did stays counted


def test_render_of_an_empty_folder(scrapes: tuple[dict[str, str], int, int]) -> None:
    assert samples(scrapes[0]["empty"]) == {}


def test_without_the_variable_every_app_has_its_own_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    assert multiprocess_dir() is None
    mark_process_dead(os.getpid())  # a no-op
    one, two = Metrics(), Metrics()
    assert one.multiprocess_dir is None
    one.requests.labels(**ROUTE).inc(2)
    one.in_flight.inc()
    one.model_info.labels(*INFO.values(), "x").set(1)
    one.model_info.remove(*INFO.values(), "x")
    one.drift_uploads.labels(model="m").set(7)
    two.requests.labels(**ROUTE).inc()
    first, second = one.render([]).decode(), two.render([]).decode()
    assert value(first, "genserve_requests_total", ROUTE) == 2
    assert value(second, "genserve_requests_total", ROUTE) == 1
    assert value(first, "genserve_in_flight_requests") == 1
    assert value(second, "genserve_in_flight_requests") == 0
    assert "genserve_model_info{" not in first  # removed, not set to 0
    assert value(first, "genserve_drift_window_uploads", {"model": "m"}) == 7  # no pid label
    assert not math.isnan(one.sample_value("genserve_requests_created", ROUTE))


def test_multiprocess_dir_reads_the_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    assert multiprocess_dir() == tmp_path
    dead = tmp_path / "gauge_livesum_123.db"
    kept = tmp_path / "counter_123.db"
    dead.touch(), kept.touch()
    mark_process_dead(123)
    assert not dead.exists() and kept.exists()
