"""Settings from the environment, and the startup checks that refuse a bad configuration."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from service.cli import main as genserve
from service.entries import RegistryError
from service.settings import Settings
from tests.service.helpers import running, worker_of

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def test_comma_lists_parse_from_plain_environment_strings(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("GENSERVE_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("GENSERVE_MODELS", "pixelcnn, vae")
    monkeypatch.setenv("GENSERVE_DEVICES", "cpu,cpu")
    monkeypatch.setenv("GENSERVE_API_KEYS", "k1,k2")
    monkeypatch.setenv("GENSERVE_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("GENSERVE_METRICS_PUBLIC", "true")
    s = Settings()
    assert s.model_names == ["pixelcnn", "vae"]
    assert s.device_list == ["cpu", "cpu"]
    assert s.api_key_list == ["k1", "k2"]
    assert s.max_batch_size == 8 and s.metrics_public is True


def test_defaults(tmp_path: Path):
    s = Settings(model_dir=tmp_path)
    assert s.model_names is None and s.device_list == ["cpu"] and s.api_key_list == []
    assert (s.max_batch_size, s.max_queue, s.max_images, s.max_samples) == (32, 256, 64, 64)


def test_workers_per_device(tmp_path: Path, monkeypatch):
    monkeypatch.setattr("service.settings.usable_cores", lambda: 2)
    auto = Settings(model_dir=tmp_path)
    assert auto.workers_per_device == "auto"
    assert auto.worker_devices(1) == ["cpu", "cpu"]  # one model on a CPU of two cores: two workers
    assert auto.worker_devices(5) == ["cpu"]  # several models: one each
    assert Settings(model_dir=tmp_path, http_processes=2).worker_devices(1) == ["cpu"]  # shared model servers
    assert Settings(model_dir=tmp_path, devices="cpu,cpu").worker_devices(1) == ["cpu", "cpu"]  # as listed
    assert Settings(model_dir=tmp_path, workers_per_device="3").worker_devices(5) == ["cpu"] * 3
    assert Settings(model_dir=tmp_path, devices="cpu,cpu", workers_per_device="2").worker_devices(1) == ["cpu"] * 4
    monkeypatch.setattr("service.settings.usable_cores", lambda: 1)
    assert Settings(model_dir=tmp_path).worker_devices(1) == ["cpu"]  # one core: nothing to share out
    for bad in ("0", "two", "-1", "65"):
        with pytest.raises(ValidationError, match='GENSERVE_WORKERS_PER_DEVICE is "auto" or a whole number'):
            Settings(model_dir=tmp_path, workers_per_device=bad)


def test_later_workers_on_a_cpu_get_processes_of_their_own_unless_told_not_to(tmp_path: Path):
    auto = Settings(model_dir=tmp_path)
    assert auto.model_process_for("vae", cpu_replica=True) and not auto.model_process_for("vae")
    assert not Settings(model_dir=tmp_path, model_process="false").model_process_for("vae", cpu_replica=True)


@no_gpu
def test_auto_devices_fall_back_to_cpu(tmp_path: Path):
    assert Settings(model_dir=tmp_path, devices="auto").device_list == ["cpu"]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("devices", "tpu", "GENSERVE_DEVICES: unknown device 'tpu'; use cpu, cuda, cuda:N, or auto"),
        ("devices", " , ", "GENSERVE_DEVICES is empty; use cpu, auto, or a list like cuda:0,cuda:1"),
        ("max_batch_size", -1, "greater than or equal to 1"),
        ("max_queue", 0, "greater than or equal to 1"),
        ("request_timeout_s", 0, "greater than 0"),
        ("shutdown_timeout_s", -1, "greater than or equal to 0"),
        ("shutdown_timeout_s", 2.5, "should be a valid integer"),
        ("cpu_compute", "per-model", "Input should be 'auto', 'shared' or 'per_model'"),
        ("max_upload_bytes", -5, "greater than or equal to 1"),
        ("body_timeout_s", 0, "greater than 0"),
        ("cors_origins", "https://app.example.com/", "GENSERVE_CORS_ORIGINS entry 'https://app.example.com/' is not"),
        ("cors_origins", "app.example.com", "with no path or trailing slash, as browsers send it"),
        ("cors_origins", "ftp://x", "is not an origin"),
        ("gil_switch_ms", 0, "greater than 0"),
        ("max_concurrent_decodes", 0, "greater than or equal to 1"),
    ],
)
def test_bad_values_refuse_to_start(tmp_path: Path, field, value, message):
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Settings(model_dir=tmp_path, **{field: value})


@no_gpu
def test_cuda_without_gpu_refuses(tmp_path: Path):
    with pytest.raises(ValidationError, match="'cuda:0' but torch sees no CUDA GPU; use cpu or auto"):
        Settings(model_dir=tmp_path, devices="cuda:0")


def test_missing_model_dir_refuses(tmp_path: Path):
    with pytest.raises(ValidationError, match="is not a folder; point it at a folder holding one subfolder per model"):
        Settings(model_dir=tmp_path / "absent")


@pytest.mark.anyio
async def test_unknown_model_name_stops_startup(make_settings):
    with pytest.raises(RegistryError, match=r"GENSERVE_MODELS names \['nope'\], not checkpoints in .*; available: "):
        async with running(make_settings(models="pixelcnn,nope")):
            pass


@pytest.mark.anyio
async def test_empty_model_dir_stops_startup(tmp_path: Path):
    with pytest.raises(RegistryError, match="holds no checkpoints"):
        async with running(Settings(model_dir=tmp_path)):
            pass


@pytest.mark.anyio
async def test_unbuildable_config_stops_startup(model_dir: Path, tmp_path: Path):
    folder = tmp_path / "odd"
    folder.mkdir()
    meta = json.loads((model_dir / "pixelcnn" / "model.json").read_text())
    meta["config"]["colour"] = "blue"
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(RegistryError, match=r"unknown gated_pixelcnn config fields \['colour'\]"):
        async with running(Settings(model_dir=tmp_path)):
            pass


def test_cli_serve_refuses_bad_settings_with_exit_code_2(tmp_path: Path, model_dir: Path, caplog):
    caplog.set_level(logging.ERROR)
    assert genserve(["serve", "--model-dir", str(tmp_path / "absent")]) == 2
    assert "invalid setting model_dir" in caplog.text and "is not a folder" in caplog.text
    assert genserve(["serve", "--model-dir", str(model_dir), "--models", "nope"]) == 2
    assert "GENSERVE_MODELS names ['nope']" in caplog.text
    assert genserve(["serve", "--model-dir", str(model_dir), "--devices", "gpu"]) == 2
    assert "unknown device 'gpu'" in caplog.text


@pytest.mark.anyio
async def test_compile_and_cuda_graphs_change_nothing_on_a_cpu_worker(make_settings):
    async with running(make_settings(models="pixelcnn", devices="cpu", compile=True, cuda_graphs=True)) as (app, _):
        model = worker_of(app, "pixelcnn").model
        assert model.compiled_log_prob is None and model.sample_cuda_graphs is False
        assert model.fast is not None  # the CPU fast forward stays


def test_the_switch_interval_is_set_only_when_asked(tmp_path: Path, monkeypatch):
    import sys

    from service.app import create_app

    intervals: list[float] = []
    monkeypatch.setattr(sys, "setswitchinterval", intervals.append)  # nothing process-wide in a test
    create_app(Settings(model_dir=tmp_path))
    assert intervals == []  # unset: Python's own 5 ms stays
    create_app(Settings(model_dir=tmp_path, gil_switch_ms=0.5))
    assert intervals == [0.0005]
