"""A full disk while calibrating (issue #20's faults): the write fails with a clear error, the
previous calibration stays whole in model.json, no temporary file is left, and a later run with
space works. The disk is made full by an ENOSPC from the kernel (/dev/full) or from a patched
fsync (where a delayed-allocation filesystem reports it); bench/reliability_faults.py fills a
real filesystem."""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from models import files
from models.checkpoint import read_metadata, save_checkpoint, update_metadata
from models.files import DiskFullError, atomic_write, atomic_write_bytes
from models.pixelcnn import PixelCNN, PixelCNNConfig
from models.tools.cli import main
from models.tools.score_sets import save_cache
from tests.helpers import TINY_PIXELCNN, dataset_meta


def disk_full_on_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fsync", fsync)


def test_a_write_cut_short_by_a_full_disk_leaves_the_old_file_and_no_temporary(tmp_path: Path):
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    target = tmp_path / "model.json"
    target.write_text('{"old": true}\n')

    def half_then_full(tmp: Path) -> None:
        tmp.write_bytes(b'{"new": ')  # the first bytes reach the disk ...
        with open("/dev/full", "wb", buffering=0) as full:
            full.write(b"x")  # ... then the kernel says ENOSPC

    with pytest.raises(DiskFullError) as got:
        atomic_write(target, half_then_full)
    assert got.value.errno == errno.ENOSPC
    assert f"no space left on the device writing {target}" in str(got.value)
    assert "model.json is unchanged" in str(got.value)
    assert target.read_text() == '{"old": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json"]


def test_other_write_errors_pass_through_and_clean_up(tmp_path: Path):
    def broken(tmp: Path) -> None:
        tmp.write_bytes(b"part")
        raise PermissionError(errno.EACCES, "denied")

    with pytest.raises(PermissionError) as got:
        atomic_write(tmp_path / "f", broken)
    assert not isinstance(got.value, DiskFullError)
    assert list(tmp_path.iterdir()) == []
    atomic_write_bytes(tmp_path / "f", b"whole")
    assert (tmp_path / "f").read_bytes() == b"whole" and len(list(tmp_path.iterdir())) == 1


def test_update_metadata_on_a_full_disk_keeps_model_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    folder = tmp_path / "m"
    save_checkpoint(PixelCNN(PixelCNNConfig(**TINY_PIXELCNN)), folder, dataset=dataset_meta())
    update_metadata(folder, calibration={"default_score": "nll", "n": 10})
    before = (folder / "model.json").read_bytes()
    disk_full_on_fsync(monkeypatch)
    with pytest.raises(DiskFullError, match=r"model\.json is unchanged"):
        update_metadata(folder, merge=False, calibration={"default_score": "dose", "n": 20})
    assert (folder / "model.json").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.safetensors"]


def test_update_metadata_replaces_a_dict_in_one_write_unless_merging(tmp_path: Path):
    folder = tmp_path / "m"
    save_checkpoint(PixelCNN(PixelCNNConfig(**TINY_PIXELCNN)), folder, dataset=dataset_meta())
    update_metadata(folder, calibration={"a": 1, "b": 2})
    assert update_metadata(folder, calibration={"b": 3})["calibration"] == {"a": 1, "b": 3}
    assert update_metadata(folder, merge=False, calibration={"c": 4})["calibration"] == {"c": 4}


def test_calibrate_on_a_full_disk_fails_clearly_and_keeps_the_old_calibration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    torch.manual_seed(0)
    folder = tmp_path / "m"
    save_checkpoint(PixelCNN(PixelCNNConfig(**TINY_PIXELCNN)), folder, dataset=dataset_meta())
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "valid.npz", images=rng.integers(0, 64, size=(40, 8, 8), dtype=np.uint8))
    argv = ["calibrate", "--model", str(folder), "--data", f"npz:{tmp_path / 'valid.npz'}", "--no-progress"]
    assert main([*argv, "--fpr", "0.05"]) == 0
    before = (folder / "model.json").read_bytes()

    with monkeypatch.context() as m:
        disk_full_on_fsync(m)
        with caplog.at_level(logging.ERROR, logger="genserve"):
            assert main([*argv, "--fpr", "0.1"]) == 3
    assert f"no space left on the device writing {folder / 'model.json'}" in caplog.text
    assert "model.json is unchanged" in caplog.text and "free some space and run it again" in caplog.text
    assert (folder / "model.json").read_bytes() == before  # byte for byte: the old calibration
    assert json.loads(before)["calibration"]["target_fpr"] == 0.05
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.safetensors"]

    assert main([*argv, "--fpr", "0.1"]) == 0  # with space again, the same command works
    assert read_metadata(folder)["calibration"]["target_fpr"] == 0.1


def test_a_cache_that_cannot_be_written_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    disk_full_on_fsync(monkeypatch)
    with caplog.at_level(logging.WARNING):
        save_cache(tmp_path / "cache" / "k.npz", {"log_prob": np.zeros(3)})
    assert "not caching" in caplog.text and "no space left on the device" in caplog.text
    assert list((tmp_path / "cache").iterdir()) == []
