"""Checkpoints: a folder with ``model.safetensors`` and ``model.json``; nothing is ever unpickled.

``model.json`` holds the kind, architecture and config that rebuild the model, the dataset it was
trained on (shape, levels, class names), a training summary, test metrics, calibration (added by
``genserve calibrate``) and the sha256 of the weights file, which is checked on every load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from models.base import DensityModel
from models.files import atomic_write, atomic_write_bytes
from models.pixelcnn import PixelCNN, PixelCNNConfig
from models.pixelrnn import PixelRNN, PixelRNNConfig
from models.vae import VAE, VAEConfig

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "model.json"
ARCHITECTURES: dict[str, tuple[type[DensityModel], type]] = {
    "gated_pixelcnn": (PixelCNN, PixelCNNConfig),
    "row_lstm": (PixelRNN, PixelRNNConfig),
    "vae": (VAE, VAEConfig),
}


class CheckpointError(ValueError):
    """A checkpoint is missing, inconsistent or tampered with; the message names the file."""


def build_model(architecture: str, config: dict[str, Any]) -> DensityModel:
    """A freshly initialised model from its architecture name and config dict."""
    if architecture not in ARCHITECTURES:
        raise CheckpointError(f"unknown architecture '{architecture}'; known: {sorted(ARCHITECTURES)}")
    cls, cfg_cls = ARCHITECTURES[architecture]
    names = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = set(config) - names
    if unknown:
        raise CheckpointError(f"unknown {architecture} config fields {sorted(unknown)}")
    return cls(cfg_cls(**config))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` atomically (models/files.py): on a full disk the old file stays whole."""
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def save_checkpoint(
    model: DensityModel,
    folder: str | Path,
    *,
    dataset: dict[str, Any],
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Write weights and metadata atomically; returns the metadata. ``state_dict`` overrides the
    model's own weights (e.g. EMA weights)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else model.state_dict()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    atomic_write(folder / WEIGHTS, lambda tmp: save_file(tensors, str(tmp)))
    meta_path = folder / META
    old = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    digest = sha256_file(folder / WEIGHTS)
    # Outlier calibration holds for the weights it was computed from; new weights need a new one.
    same_weights = (old.get("weights") or {}).get("sha256") == digest
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": model.kind,
        "architecture": model.architecture,
        "exact_likelihood": model.exact,
        "config": dataclasses.asdict(model.config),
        "dataset": dataset,
        "training": training or {},
        "metrics": metrics if metrics is not None else old.get("metrics", {}),
        "calibration": old.get("calibration") if same_weights else None,
        "parameters": sum(int(t.numel()) for t in tensors.values()),
        "weights": {
            "file": WEIGHTS,
            "sha256": digest,
            "bytes": (folder / WEIGHTS).stat().st_size,
        },
    }
    _write_json(meta_path, meta)
    return meta


def read_metadata(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / META
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint metadata (expected {META} beside {WEIGHTS})")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e
    for key in ("kind", "architecture", "config", "weights"):
        if key not in meta:
            raise CheckpointError(f"{path}: missing field '{key}'")
    return meta


def update_metadata(folder: str | Path, *, merge: bool = True, **fields: Any) -> dict[str, Any]:
    """Set top-level fields (e.g. metrics, calibration) of model.json in one atomic write; a dict
    merges into the old one unless ``merge=False``. Weights are untouched. On a full disk
    (:class:`DiskFullError`) model.json is left as it was."""
    meta = read_metadata(folder)
    for k, v in fields.items():
        if merge and isinstance(v, dict) and isinstance(meta.get(k), dict):
            meta[k] = {**meta[k], **v}
        else:
            meta[k] = v
    _write_json(Path(folder) / META, meta)
    return meta


def load_checkpoint(folder: str | Path, device: str | torch.device = "cpu") -> tuple[DensityModel, dict[str, Any]]:
    """Rebuild a model from its folder, verifying the weights' sha256; returns (model in eval mode, metadata)."""
    folder = Path(folder)
    meta = read_metadata(folder)
    weights = folder / meta["weights"].get("file", WEIGHTS)
    if not weights.is_file():
        raise CheckpointError(f"{weights}: weights file missing")
    digest = sha256_file(weights)
    if digest != meta["weights"].get("sha256"):
        raise CheckpointError(
            f"{weights}: sha256 {digest} does not match {folder / META} ({meta['weights'].get('sha256')}); "
            "the file is corrupt or was modified"
        )
    model = build_model(meta["architecture"], meta["config"])
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for malformed files
        raise CheckpointError(f"{weights}: unreadable safetensors file ({e})") from e
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{weights}: weights do not fit the config in {META}: {e}") from e
    return model.to(device).eval(), meta
