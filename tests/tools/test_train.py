"""Training: outputs, exact resume after an interruption, time budget, the CLI and DDP on CPU."""

from __future__ import annotations

import dataclasses
import gzip
import itertools
import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from models.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from models.tools import train as train_mod
from models.tools.cli import main
from models.tools.data import load_dataset, validation_indices
from models.tools.train import STATE, STATE_META, TrainConfig, train
from models.vae import VAE, VAEConfig

REPO = Path(__file__).resolve().parents[2]
TINY_PIXELCNN = {"hidden": 4, "n_blocks": 1, "first_kernel": 3, "kernel": 3, "out_hidden": 8}
TINY_VAE = {"latent_dim": 3, "hidden": 4, "downsample": 1, "n_mixtures": 2, "iwae_samples": 4, "iwae_chunk": 4}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and do not stall when other jobs share the CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_images(n: int = 64, seed: int = 0) -> np.ndarray:
    """n 4x4 images: a smooth random gradient plus noise, so there is something to learn."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, 16).reshape(4, 4)
    return np.clip(ramp[None] * rng.uniform(0.5, 1.0, (n, 1, 1)) + rng.integers(0, 40, (n, 4, 4)), 0, 255).astype(
        np.uint8
    )


@pytest.fixture
def npz(tmp_path: Path) -> str:
    path = tmp_path / "tiny.npz"
    np.savez(path, images=tiny_images(), labels=np.arange(64) % 3)
    return f"npz:{path}"


def config(data: str, out: Path, **overrides: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "architecture": "gated_pixelcnn", "model": dict(TINY_PIXELCNN), "data": data, "out": str(out),
        "epochs": 2, "batch_size": 8, "lr": 1e-2, "warmup_steps": 2, "ema": 0.9, "device": "cpu",
        "test_eval": False, "progress": False, "val_batch_size": 4,
    }  # fmt: skip
    base.update(overrides)
    return TrainConfig(**base)


def log_records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


# -- one run -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("architecture", "model"), [("gated_pixelcnn", TINY_PIXELCNN), ("vae", TINY_VAE)])
def test_train_writes_a_loadable_checkpoint_and_a_log(
    npz: str, tmp_path: Path, architecture: str, model: dict[str, Any]
) -> None:
    out = tmp_path / "run"
    result = train(config(npz, out, architecture=architecture, model=dict(model)))
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "model.json", "train_log.jsonl", STATE, STATE_META}
    assert result["epochs_done"] == 2 and result["steps"] == 2 * (58 // 8)  # 64 images, 6 held out
    records = log_records(out)
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(np.isfinite(r["val_bpd"]) and r["val_bpd"] > 0 for r in records)
    assert result["best_val_bits_per_dim"] == min(r["val_bpd"] for r in records)

    loaded, meta = load_checkpoint(out)
    assert loaded.architecture == architecture
    assert loaded.shape == (1, 4, 4) and loaded.levels == 256
    assert meta["dataset"]["shape"] == [1, 4, 4] and meta["dataset"]["spec"] == npz
    training = meta["training"]
    assert training["world_size"] == 1 and training["config"]["data"] == npz
    assert training["val_bits_per_dim"] == pytest.approx(result["best_val_bits_per_dim"])
    x = load_dataset(npz).images[:4]
    with torch.no_grad():
        assert torch.isfinite(loaded.log_prob(x)).all()


def test_training_lowers_validation_bits_per_dim(npz: str, tmp_path: Path) -> None:
    result = train(config(npz, tmp_path / "run", epochs=3))
    records = log_records(tmp_path / "run")
    assert records[-1]["val_bpd"] < records[0]["val_bpd"] < 8.5
    assert result["best_val_bits_per_dim"] < 8.0  # better than uniform over 256 levels


def test_checkpoint_holds_the_ema_weights(npz: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(config(npz, out, epochs=1))
    state, saved = load_file(str(out / STATE)), load_file(str(out / "model.safetensors"))
    for k, v in saved.items():  # one epoch: the only (so the best) checkpoint is the final EMA
        torch.testing.assert_close(v, state[f"ema.{k}"].to(v.dtype), rtol=0, atol=0)
    assert any(not torch.equal(v, state[f"model.{k}"]) for k, v in saved.items())

    plain = tmp_path / "plain"
    train(config(npz, plain, epochs=1, ema=None))
    state, saved = load_file(str(plain / STATE)), load_file(str(plain / "model.safetensors"))
    assert not any(k.startswith("ema.") for k in state)
    for k, v in saved.items():
        assert torch.equal(v, state[f"model.{k}"]), k


def test_learning_rate_warms_up_then_decays_to_the_floor() -> None:
    cfg = TrainConfig(lr=1e-2, warmup_steps=10, min_lr_ratio=0.1)
    assert train_mod.lr_at(cfg, 0.0, 0) == pytest.approx(1e-3)
    assert train_mod.lr_at(cfg, 0.0, 9) == pytest.approx(1e-2)
    assert train_mod.lr_at(cfg, 0.5, 100) == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5))
    assert train_mod.lr_at(cfg, 1.0, 1000) == pytest.approx(1e-3)
    assert train_mod.lr_at(cfg, 3.0, 1000) == pytest.approx(1e-3)  # past the end (time budget): stays at the floor
    after_warmup = [train_mod.lr_at(cfg, f / 10, 10 + f) for f in range(11)]
    assert all(a >= b for a, b in itertools.pairwise(after_warmup))


def test_perturb_replaces_sub_pixels_with_uniform_levels() -> None:
    x = torch.full((200, 1, 8, 8), 7, dtype=torch.uint8)
    assert train_mod.perturb(x, 0.0, 16) is x
    torch.manual_seed(0)
    y = train_mod.perturb(x, 0.25, 16)
    assert y.dtype == torch.uint8 and int(y.max()) < 16
    changed = (y != 7).double().mean().item()
    assert changed == pytest.approx(0.25 * 15 / 16, abs=0.01)  # a replacement may redraw 7
    all_noise = train_mod.perturb(x, 1.0, 16)
    assert torch.bincount(all_noise.flatten().long(), minlength=16).min() > 600  # every level, roughly uniform


def test_time_budget_stops_training_cleanly(npz: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = train(config(npz, out, epochs=50, max_minutes=1e-9))
    assert result["steps"] == 1 and result["epochs_done"] == 0
    load_checkpoint(out)  # the partial run still saved its best model


# -- resume --------------------------------------------------------------------------------------


class Interrupt(BaseException):
    """Stands in for Ctrl-C or a kill: not an Exception, so nothing on the way catches it."""


def interrupt_after(monkeypatch: pytest.MonkeyPatch, calls: int) -> None:
    """Raise on the (calls+1)-th call of ``perturb``, which runs once per training step and once
    per validation batch (7 steps per epoch here, then 2 validation batches)."""
    real = train_mod.perturb
    count = 0

    def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
        nonlocal count
        count += 1
        if count > calls:
            raise Interrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "perturb", counting)


@pytest.mark.parametrize(
    ("architecture", "calls"),
    [("gated_pixelcnn", 3), ("gated_pixelcnn", 8), ("gated_pixelcnn", 12), ("vae", 12)],
    ids=["mid-epoch-1", "during-validation", "mid-epoch-2", "vae-mid-epoch-2"],
)
def test_resumed_run_matches_an_unbroken_one(
    npz: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, architecture: str, calls: int
) -> None:
    # The VAE draws fresh noise every step: resuming must restore the random stream too.
    model = dict(TINY_VAE if architecture == "vae" else TINY_PIXELCNN)
    a, b = tmp_path / "a", tmp_path / "b"
    train(config(npz, a, architecture=architecture, model=model))

    with monkeypatch.context() as m:
        interrupt_after(m, calls)
        with pytest.raises(Interrupt):  # resume state saved after every step
            train(config(npz, b, architecture=architecture, model=model, save_every_minutes=0))
    interrupted = load_file(str(b / STATE))
    final_a = load_file(str(a / STATE))
    assert not all(torch.equal(interrupted[k], final_a[k]) for k in final_a if k.startswith("model."))

    result = train(config(npz, b, architecture=architecture, model=model))
    assert result["epochs_done"] == 2 and result["steps"] == 14
    final_b = load_file(str(b / STATE))
    assert final_a.keys() == final_b.keys()
    for k in final_a:  # model, EMA and Adam moments
        torch.testing.assert_close(final_b[k], final_a[k], rtol=1e-5, atol=1e-6, msg=k)
    weights_a, weights_b = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    for k in weights_a:
        torch.testing.assert_close(weights_b[k], weights_a[k], rtol=1e-5, atol=1e-6, msg=k)
    log_a, log_b = log_records(a), log_records(b)
    assert [(r["epoch"], r["step"]) for r in log_b] == [(r["epoch"], r["step"]) for r in log_a]
    np.testing.assert_allclose([r["val_bpd"] for r in log_b], [r["val_bpd"] for r in log_a], rtol=1e-5)


def test_rerunning_a_finished_run_changes_nothing(npz: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(config(npz, out))
    before = (out / "model.safetensors").read_bytes(), (out / STATE).read_bytes()
    result = train(config(npz, out, progress=True, test_eval=True))  # fields that may change
    assert result["epochs_done"] == 2 and result["steps"] == 14
    assert ((out / "model.safetensors").read_bytes(), (out / STATE).read_bytes()) == before
    assert len(log_records(out)) == 2


@pytest.mark.parametrize("change", [{"lr": 5e-3}, {"batch_size": 4}, {"model": {**TINY_PIXELCNN, "hidden": 6}}])
def test_resuming_with_a_different_config_is_refused(npz: str, tmp_path: Path, change: dict[str, Any]) -> None:
    out = tmp_path / "run"
    train(config(npz, out, epochs=1))
    with pytest.raises(ValueError, match=f"different config.*{next(iter(change))}") as err:
        train(config(npz, out, **{"epochs": 1, **change}))
    assert str(out / STATE_META) in str(err.value)


def test_a_finished_run_resumes_with_a_larger_budget(npz: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(config(npz, out, epochs=1))
    result = train(config(npz, out, epochs=2))  # the budget may grow: training goes on from the state
    assert result["epochs_done"] == 2 and result["steps"] == 14
    assert [r["epoch"] for r in log_records(out)] == [1, 2]


# -- named datasets, conditioning, test evaluation -----------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_conditional_model_on_a_named_dataset_reports_test_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "datasets"
    folder = root / "fashion-mnist"
    folder.mkdir(parents=True)
    for prefix, n, seed in (("train-", 60, 0), ("t10k-", 10, 1)):
        write_idx(folder / f"{prefix}images-idx3-ubyte.gz", tiny_images(n, seed))
        write_idx(folder / f"{prefix}labels-idx1-ubyte.gz", np.arange(n) % 10)
    monkeypatch.setenv("GENSERVE_DATA_DIR", str(root))
    monkeypatch.setenv("GENSERVE_NO_DOWNLOAD", "1")
    out = tmp_path / "run"
    result = train(config("fashion-mnist", out, epochs=1, conditional=True, test_eval=True))
    assert result["test"]["test_data"] == "fashion-mnist:test"
    model, meta = load_checkpoint(out)
    assert model.n_classes == 10 and meta["dataset"]["classes"][0] == "T-shirt/top"
    # p(y) for Bayes' rule: the training split's labels per class (the validation images left out)
    train_idx, _ = validation_indices(60)
    assert (
        meta["dataset"]["class_counts"] == np.bincount((np.arange(60) % 10)[train_idx.numpy()], minlength=10).tolist()
    )
    assert meta["metrics"]["test_bits_per_dim"] == pytest.approx(result["test"]["test_bits_per_dim"])


@pytest.mark.parametrize("cpu_amp", [False, True])
def test_cpu_amp_trains_and_validates_in_bf16_but_tests_in_float32(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpu_amp: bool
) -> None:
    from models.pixelcnn import PixelCNN

    root = tmp_path / "datasets"
    (root / "fashion-mnist").mkdir(parents=True)
    for prefix, n, seed in (("train-", 60, 0), ("t10k-", 10, 1)):
        write_idx(root / "fashion-mnist" / f"{prefix}images-idx3-ubyte.gz", tiny_images(n, seed))
        write_idx(root / "fashion-mnist" / f"{prefix}labels-idx1-ubyte.gz", np.arange(n) % 10)
    monkeypatch.setenv("GENSERVE_DATA_DIR", str(root))
    monkeypatch.setenv("GENSERVE_NO_DOWNLOAD", "1")
    seen: list[tuple[str, bool]] = []  # (phase, autocast on) per forward pass
    logits = PixelCNN.logits

    def spy(self: PixelCNN, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        phase = "test" if tested else ("train" if self.training else "val")
        seen.append((phase, torch.is_autocast_enabled("cpu")))
        return logits(self, x, y)

    tested = False
    monkeypatch.setattr(PixelCNN, "logits", spy)
    trainer_test_eval = train_mod.Trainer.test_eval

    def mark_test(self: Any, test: Any) -> dict[str, Any]:
        nonlocal tested
        tested = True
        return trainer_test_eval(self, test)

    monkeypatch.setattr(train_mod.Trainer, "test_eval", mark_test)
    out = tmp_path / "run"
    result = train(config("fashion-mnist", out, epochs=1, test_eval=True, cpu_amp=cpu_amp))
    phases = {phase for phase, _ in seen}
    assert phases == {"train", "val", "test"}
    assert all(on == cpu_amp for phase, on in seen if phase != "test")
    assert not any(on for phase, on in seen if phase == "test")  # the reported figure is float32
    assert all(v.dtype == torch.float32 for v in load_file(str(out / "model.safetensors")).values())
    assert np.isfinite(result["test"]["test_bits_per_dim"])


def test_conditional_training_needs_class_names(npz: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs labels and class names"):
        train(config(npz, tmp_path / "run", conditional=True))


def test_train_config_rejects_unknown_fields() -> None:
    with pytest.raises(ValueError, match="unknown training config fields \\['epoch'\\]"):
        TrainConfig.from_dict({"epoch": 3})
    assert TrainConfig.from_dict({"epochs": 3}) == dataclasses.replace(TrainConfig(), epochs=3)


# -- command line --------------------------------------------------------------------------------


def cli_train_args(npz: str, out: Path) -> list[str]:
    args = ["train", "--data", npz, "--out", str(out), "--epochs", "1", "--batch-size", "8", "--lr", "0.01"]
    for key, value in TINY_PIXELCNN.items():
        args += ["--set", f"model.{key}={value}"]
    return [*args, "--set", "test_eval=false", "--set", "warmup_steps=2", "--device", "cpu", "--no-progress"]


def test_cli_train_then_eval(npz: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(cli_train_args(npz, out)) == 0
    meta = read_metadata(out)
    assert meta["config"]["hidden"] == 4 and meta["training"]["config"]["epochs"] == 1
    capsys.readouterr()

    report_path = tmp_path / "report.json"
    argv = ["eval", "--model", str(out), "--data", npz, "--device", "cpu", "--no-progress", "--batch-size", "16"]
    assert main([*argv, "--report", str(report_path), "--update-metadata"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 64 and report["exact"] is True and report["data"] == npz
    assert 0 < report["bits_per_dim"] < 9
    assert report["nats_per_image"] == pytest.approx(report["bits_per_dim"] * 16 * np.log(2), rel=1e-5)
    assert json.loads(report_path.read_text()) == report
    assert read_metadata(out)["metrics"]["test_bits_per_dim"] == report["bits_per_dim"]


def test_cli_eval_of_a_vae_reports_iwae_and_elbo(npz: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    vae = VAE(VAEConfig(height=4, width=4, **TINY_VAE))
    save_checkpoint(vae, tmp_path / "vae", dataset={"spec": npz})
    assert main(["eval", "--model", str(tmp_path / "vae"), "--data", npz, "--iwae-k", "8", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["exact"] is False and "k=8" in report["estimator"]
    assert report["bits_per_dim"] <= report["elbo_bits_per_dim"]  # the IWAE bound is the tighter one


def test_cli_reports_bad_config_with_exit_code_2(npz: str, tmp_path: Path) -> None:
    assert main(["train", "--data", npz, "--out", str(tmp_path / "run"), "--set", "bogus=1", "--no-progress"]) == 2
    assert main(["eval", "--model", str(tmp_path / "nothing"), "--data", npz, "--no-progress"]) == 2


# -- distributed ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_on_cpu_with_two_processes(npz: str, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "models.tools.cli", *cli_train_args(npz, out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, meta = load_checkpoint(out)
    assert meta["training"]["world_size"] == 2
    assert meta["training"]["steps"] == (58 // 2) // 8  # each process takes half of each epoch
    with torch.no_grad():
        assert torch.isfinite(model.log_prob(load_dataset(npz).images[:4])).all()
