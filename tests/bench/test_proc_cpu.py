"""bench/proc_cpu.py: a server's CPU time, its descendants' included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from proc_cpu import busiest_threads, cpu_ms_per_request, descendants, thread_cpu_seconds, tree_cpu_seconds  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads Linux's /proc")

# A parent that starts a child burning CPU, then waits for it: the parent itself spends almost none.
CHILD = (
    "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\n"
    "print('done', flush=True)\ntime.sleep(30)"
)
PARENT = f"""
import subprocess, sys
subprocess.Popen([sys.executable, "-c", {CHILD!r}], stdout=sys.stdout).wait()
"""


def test_the_tree_counts_a_child_s_cpu_time() -> None:
    with subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True) as parent:
        try:
            assert parent.stdout is not None
            assert parent.stdout.readline().strip() == "done"  # the child has burnt 0.6 s of CPU
            tree = descendants(parent.pid)
            assert tree[0] == parent.pid and len(tree) == 2
            spent = tree_cpu_seconds(parent.pid)
            own = tree_cpu_seconds(tree[1])
            assert own is not None and own >= 0.6 and spent is not None and spent >= own
        finally:
            for pid in descendants(parent.pid)[::-1]:
                subprocess.run(["kill", str(pid)], check=False)


def test_per_request_milliseconds() -> None:
    assert cpu_ms_per_request(1.0, 1.5, 100) == pytest.approx(5.0)
    assert cpu_ms_per_request(None, 1.5, 100) is None and cpu_ms_per_request(1.0, 1.5, 0) is None


# A process whose second thread burns CPU (and then stays) while its main thread sleeps.
BURNER = """
import threading, time
def burn():
    print("ready", flush=True)
    t = time.thread_time()
    while time.thread_time() - t < 0.5:
        pass
    print("done", flush=True)
    time.sleep(30)
threading.Thread(target=burn).start()
time.sleep(30)
"""


def test_the_busiest_thread_is_the_one_that_burnt_the_cpu() -> None:
    with subprocess.Popen([sys.executable, "-c", BURNER], stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            before = thread_cpu_seconds(proc.pid)
            assert before is not None and f"{proc.pid}/{proc.pid}" in before  # the main thread
            assert proc.stdout.readline().strip() == "done"
            after = thread_cpu_seconds(proc.pid)
            got = busiest_threads(before, after, 10, root=proc.pid, top=2)
            assert got is not None and len(got) == 2 and [t["where"] for t in got] == ["server", "server"]
            busiest, other = got
            assert busiest["ms_per_request"] >= 20  # most of the 0.5 s burnt after the first reading, over 10
            assert other["ms_per_request"] < busiest["ms_per_request"] / 4
        finally:
            proc.kill()


def test_busiest_threads_needs_both_readings_and_requests() -> None:
    assert busiest_threads(None, {"1/1": 1.0}, 5, root=1, top=3) is None
    assert busiest_threads({"1/1": 0.0}, {"1/1": 1.0}, 0, root=1, top=3) is None
    got = busiest_threads({"1/1": 0.0}, {"1/1": 0.2, "2/3": 1.0}, 100, root=1, top=3)  # a thread born meanwhile
    assert got == [{"ms_per_request": 10.0, "where": "child"}, {"ms_per_request": 2.0, "where": "server"}]
