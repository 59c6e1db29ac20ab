"""bench/proc_cpu.py: a server's CPU time, its descendants' included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from proc_cpu import cpu_ms_per_request, descendants, tree_cpu_seconds  # noqa: E402

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
