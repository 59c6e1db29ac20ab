"""The checkpoints shipped in checkpoints/: what `make serve` loads must verify, be calibrated for
these very weights, and carry the test figures the README quotes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from models.checkpoint import load_checkpoint, read_metadata

STORE = Path(__file__).resolve().parents[2] / "checkpoints"
SHIPPED = sorted(p.name for p in STORE.iterdir() if (p / "model.json").is_file()) if STORE.is_dir() else []


def test_the_store_ships_every_kind_of_model() -> None:
    metas = [read_metadata(STORE / n) for n in SHIPPED]
    kinds = {(m["kind"], m["config"].get("n_classes")) for m in metas}
    assert ("autoregressive", None) in kinds, SHIPPED
    assert any(k == "autoregressive" and c for k, c in kinds), "a class-conditional model"
    assert any(k == "vae" for k, _ in kinds), SHIPPED
    assert any(m["architecture"] == "row_lstm" for m in metas), "a PixelRNN (Row LSTM)"


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_checkpoint_verifies_and_is_calibrated(name: str) -> None:
    folder = STORE / name
    model, meta = load_checkpoint(folder)  # verifies the sha256 of the weights
    assert folder.joinpath(meta["weights"]["file"]).stat().st_size < 20 * 2**20, "checkpoints stay under ~20 MB"
    metrics = meta["metrics"]
    assert metrics["test_data"] == "fashion-mnist:test"
    assert 2.0 < metrics["test_bits_per_dim"] < 4.59, "better than an independent per-pixel model"
    calibration = meta["calibration"]
    assert calibration["weights_sha256"] == meta["weights"]["sha256"], "calibrated for other weights: recalibrate"
    assert calibration["default_score"] in calibration["scores"]
    x = torch.zeros(2, *model.shape, dtype=torch.uint8)
    y = torch.zeros(2, dtype=torch.long) if model.n_classes is not None else None
    with torch.inference_mode():
        if meta["kind"] == "vae":
            lp = model.iwae(x, k=2)  # log_prob's k=128 is the evaluation's; two samples suffice here
        else:
            lp = model.log_prob(x, y)
    assert lp.shape == (2,) and all(math.isfinite(float(v)) and float(v) < 0 for v in lp)
