"""Checkpoints: safetensors + model.json round trips, sha256 verification, clear errors, no pickle."""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from models.base import DensityModel
from models.checkpoint import (
    META,
    WEIGHTS,
    CheckpointError,
    build_model,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
    update_metadata,
)
from models.pixelcnn import PixelCNN, PixelCNNConfig
from models.vae import VAE, VAEConfig

DATASET = {"spec": "npz:tiny.npz", "name": "npz", "shape": [1, 4, 4], "levels": 16, "classes": None}
PIXELCNN = {
    "in_channels": 1, "height": 4, "width": 4, "levels": 16, "hidden": 4, "n_blocks": 1,
    "first_kernel": 3, "kernel": 3, "out_hidden": 8,
}  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and do not stall when other jobs share the CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def images(n: int = 4) -> torch.Tensor:
    return torch.randint(0, 16, (n, 1, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


@pytest.fixture
def saved(tmp_path: Path) -> tuple[PixelCNN, Path]:
    torch.manual_seed(0)
    model = PixelCNN(PixelCNNConfig(**PIXELCNN)).eval()
    folder = tmp_path / "ckpt"
    save_checkpoint(model, folder, dataset=DATASET, training={"epochs_done": 1})
    return model, folder


def edit_meta(folder: Path, change: Any) -> None:
    meta = json.loads((folder / META).read_text())
    change(meta)
    (folder / META).write_text(json.dumps(meta))


def test_save_then_load_gives_the_same_log_prob(saved: tuple[PixelCNN, Path]) -> None:
    model, folder = saved
    loaded, meta = load_checkpoint(folder)
    assert isinstance(loaded, PixelCNN) and not loaded.training
    assert loaded.config == model.config
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded.log_prob(x), model.log_prob(x))
    assert meta["kind"] == "autoregressive" and meta["architecture"] == "gated_pixelcnn"
    assert meta["exact_likelihood"] is True
    assert meta["dataset"] == DATASET and meta["training"] == {"epochs_done": 1}
    assert meta["parameters"] == sum(p.numel() for p in model.parameters())
    assert meta["weights"]["file"] == WEIGHTS and len(meta["weights"]["sha256"]) == 64
    assert sorted(p.name for p in folder.iterdir()) == sorted([WEIGHTS, META])  # no temporary files left


def test_vae_round_trip_keeps_its_estimator_settings(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = VAEConfig(height=4, width=4, levels=16, latent_dim=3, hidden=4, downsample=1, n_mixtures=2, iwae_samples=8)
    model = VAE(cfg).eval()
    save_checkpoint(model, tmp_path, dataset=DATASET)
    loaded, meta = load_checkpoint(tmp_path)
    assert isinstance(loaded, VAE) and meta["exact_likelihood"] is False and meta["kind"] == "vae"
    with torch.no_grad():
        assert torch.equal(loaded.log_prob(images()), model.log_prob(images()))


def test_explicit_state_dict_is_what_gets_saved(tmp_path: Path) -> None:
    # The trainer saves EMA weights this way: the file must hold them, not the live weights.
    torch.manual_seed(0)
    model = PixelCNN(PixelCNNConfig(**PIXELCNN))
    other = {k: torch.full_like(v, 0.01) for k, v in model.state_dict().items()}
    save_checkpoint(model, tmp_path, dataset=DATASET, state_dict=other)
    loaded, _ = load_checkpoint(tmp_path)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, other[k]), k


def test_resaving_keeps_metrics_and_calibration(saved: tuple[PixelCNN, Path]) -> None:
    model, folder = saved
    update_metadata(folder, metrics={"test_bits_per_dim": 3.5}, calibration={"threshold": -1.0})
    meta = update_metadata(folder, metrics={"test_nats_per_image": 40.0})
    assert meta["metrics"] == {"test_bits_per_dim": 3.5, "test_nats_per_image": 40.0}  # merged, not replaced
    save_checkpoint(model, folder, dataset=DATASET)
    meta = read_metadata(folder)
    assert meta["metrics"]["test_bits_per_dim"] == 3.5 and meta["calibration"] == {"threshold": -1.0}
    load_checkpoint(folder)  # update_metadata never touches the weights or their hash


def test_flipped_byte_in_weights_is_detected(saved: tuple[PixelCNN, Path]) -> None:
    _, folder = saved
    weights = folder / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256") as err:
        load_checkpoint(folder)
    assert str(weights) in str(err.value)


def test_wrong_sha_in_metadata_is_detected(saved: tuple[PixelCNN, Path]) -> None:
    _, folder = saved
    edit_meta(folder, lambda m: m["weights"].update(sha256="0" * 64))
    with pytest.raises(CheckpointError, match="does not match") as err:
        load_checkpoint(folder)
    assert WEIGHTS in str(err.value)


@pytest.mark.parametrize(
    "change",
    [{"hidden": 8}, {"n_blocks": 2}, {"levels": 8}, {"in_channels": 3}],
    ids=["hidden", "blocks", "levels", "channels"],
)
def test_config_that_does_not_fit_the_weights_is_rejected(saved: tuple[PixelCNN, Path], change: dict[str, int]) -> None:
    _, folder = saved
    edit_meta(folder, lambda m: m["config"].update(change))
    with pytest.raises(CheckpointError, match="do not fit the config") as err:
        load_checkpoint(folder)
    assert WEIGHTS in str(err.value)


def test_unknown_config_field_or_architecture_is_rejected(saved: tuple[PixelCNN, Path]) -> None:
    _, folder = saved
    edit_meta(folder, lambda m: m["config"].update(colour="blue"))
    with pytest.raises(CheckpointError, match="colour"):
        load_checkpoint(folder)
    with pytest.raises(CheckpointError, match="unknown architecture 'transformer'"):
        build_model("transformer", {})


def test_missing_metadata_says_what_is_expected(saved: tuple[PixelCNN, Path]) -> None:
    _, folder = saved
    (folder / META).unlink()
    with pytest.raises(CheckpointError, match=f"no checkpoint metadata.*{META}"):
        load_checkpoint(folder)
    with pytest.raises(CheckpointError, match="no checkpoint metadata"):
        load_checkpoint(folder / "does-not-exist")


def test_missing_weights_or_broken_json_are_reported(saved: tuple[PixelCNN, Path]) -> None:
    _, folder = saved
    (folder / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match="weights file missing"):
        load_checkpoint(folder)
    (folder / META).write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        load_checkpoint(folder)
    (folder / META).write_text(json.dumps({"kind": "vae", "config": {}}))
    with pytest.raises(CheckpointError, match="missing field 'architecture'"):
        load_checkpoint(folder)


def test_malformed_safetensors_with_matching_hash_is_reported(saved: tuple[PixelCNN, Path]) -> None:
    # Someone replaced the weights and updated the hash: the file still has to parse.
    from models.checkpoint import sha256_file

    _, folder = saved
    (folder / WEIGHTS).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bogus}!")
    edit_meta(folder, lambda m: m["weights"].update(sha256=sha256_file(folder / WEIGHTS)))
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load_checkpoint(folder)


def test_loading_never_unpickles(saved: tuple[PixelCNN, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle used while loading a checkpoint")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    model, folder = saved
    loaded: DensityModel
    loaded, _ = load_checkpoint(folder)
    with torch.no_grad():
        assert torch.equal(loaded.log_prob(images()), model.log_prob(images()))


def test_a_skeleton_on_the_meta_device_stays_out_of_torch_s_python_meta_functions() -> None:
    """Every shipped architecture built on the meta device (service/entries.py's skeleton, at every
    server start) without torch._dynamo or sympy: torch imports them, for seconds, the first time
    one of its Python meta functions runs (integer mask arithmetic, ``normal_``)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    code = (
        "import sys, torch\n"
        "from pathlib import Path\n"
        "from models.checkpoint import META, build_model, read_metadata\n"
        "for f in sorted(Path('checkpoints').glob(f'*/{META}')):\n"
        "    meta = read_metadata(f.parent)\n"
        "    with torch.device('meta'):\n"
        "        m = build_model(meta['architecture'], meta['config'])\n"
        "    assert all(t.is_meta for t in [*m.parameters(), *m.buffers()]), f.parent\n"
        "    print(f.parent.name, sorted(n for n in ('torch._dynamo', 'sympy') if n in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")[:-1]
    assert len(lines) >= 5 and all(line.endswith(" []") for line in lines), out.stdout
