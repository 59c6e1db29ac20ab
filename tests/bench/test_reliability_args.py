"""The drift example's and the reliability campaign's argument parsing (the campaigns themselves run
outside `make test`: docs/drift.md, docs/reliability.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import drift_example  # noqa: E402
import reliability  # noqa: E402


def test_reliability_defaults_match_the_issue() -> None:
    args = reliability.parse_args(["reload"])
    assert (args.reloads, args.broken, args.clients) == (10, 2, 4)
    assert reliability.parse_args(["sigterm"]).in_flight == 64
    assert reliability.parse_args(["soak", "--duration-s", "600"]).duration_s == 600


@pytest.mark.parametrize("bad", [["nope"], ["soak", "--duration-s", "0"], ["reload", "--clients", "0"],
                                 ["reload", "--broken", "-1"]])  # fmt: skip
def test_reliability_refuses_bad_arguments(bad: list[str]) -> None:
    with pytest.raises(SystemExit):
        reliability.parse_args(bad)


def test_drift_example_arguments() -> None:
    args = drift_example.parse_args(["--window", "500", "--streams", "3"])
    assert (args.window, args.streams, args.alpha) == (500, 3, 0.001)
    with pytest.raises(SystemExit):
        drift_example.parse_args(["--window", "0"])


def test_reliability_percentile_and_summary() -> None:
    assert reliability.percentile([], 99) is None
    assert reliability.percentile([float(i) for i in range(1, 101)], 99) == 99.0
    records = [reliability.Record("score", 0.0, 0.1, 200), reliability.Record("sample", 0.0, 0.2, 503)]
    summary = reliability.phase_summary(records)
    assert summary["requests"] == 2 and summary["failed"] == 1 and summary["failed_by_status"] == {"503": 1}
