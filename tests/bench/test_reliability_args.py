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
import reliability_faults  # noqa: E402


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


def test_reliability_faults_arguments() -> None:
    args = reliability_faults.parse_args(["crash"])
    assert (args.clients, args.poison, args.inside) == (8, 40, None)
    assert reliability_faults.parse_args(["full-disk", "--disk-kib", "512"]).disk_kib == 512
    for bad in (["nope"], ["crash", "--poison", "0"], ["crash", "--every-s", "0"]):
        with pytest.raises(SystemExit):
            reliability_faults.parse_args(bad)


def test_the_load_takes_the_image_shape_from_model_json(tmp_path: Path) -> None:
    (tmp_path / "model.json").write_text('{"dataset": {"shape": [1, 28, 28]}}')
    assert reliability.image_shape(tmp_path) == (28, 28)
    (tmp_path / "model.json").write_text('{"dataset": {"shape": [3, 8, 8]}}')
    with pytest.raises(SystemExit, match="one-channel"):
        reliability.image_shape(tmp_path)


def test_the_fault_launcher_crashes_only_batches_holding_the_poison_image() -> None:
    import fault_serve
    import torch

    from models.pixelcnn import PixelCNN, PixelCNNConfig

    model = PixelCNN(PixelCNNConfig(in_channels=1, height=4, width=4, hidden=4, n_blocks=1)).eval()
    original = PixelCNN.pixel_log_prob
    try:
        fault_serve.inject()
        good = torch.zeros(2, 1, 4, 4, dtype=torch.long)
        assert model.log_prob(good).shape == (2,)
        with pytest.raises(RuntimeError, match="injected fault"):
            model.log_prob(torch.cat([good, torch.full((1, 1, 4, 4), fault_serve.POISON)]))
    finally:
        PixelCNN.pixel_log_prob = original  # type: ignore[method-assign]
