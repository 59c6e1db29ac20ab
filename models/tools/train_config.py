"""Training configuration and the small pieces of training: ``TrainConfig``, the learning-rate
schedule, background-model perturbation, the train/valid/test split, the EMA of the weights and
the state a run carries from step to step.

Kept apart from the ``Trainer`` (``models/tools/train.py``), which re-exports every name here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from models.base import DensityModel
from models.tools.data import ImageDataset, load_dataset, validation_indices


@dataclass
class TrainConfig:
    architecture: str = "gated_pixelcnn"
    model: dict[str, Any] = field(default_factory=dict)  # model config fields; shape and levels come from the data
    data: str = "fashion-mnist"  # named dataset (train/valid/test splits) or npz:/folder: spec
    out: str = "runs/model"
    epochs: int = 10
    batch_size: int = 64  # per process
    lr: float = 1e-3
    min_lr_ratio: float = 0.02  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema: float | None = 0.999  # EMA decay of the weights used for validation and the checkpoint
    seed: int = 0
    max_minutes: float | None = None  # time budget; the schedule follows whichever ends first
    save_every_minutes: float = 5.0  # resume state cadence
    conditional: bool = False  # class-conditional model (n_classes from the dataset)
    perturb: float = 0.0  # Ren et al. 2019 background model: replace each sub-pixel with prob perturb
    device: str = "auto"  # auto = cuda if available, else cpu
    amp: bool = True  # bf16 autocast on CUDA
    cpu_amp: bool = False  # bf16 autocast on CPU too (pays off where the CPU has avx512_bf16 or AMX)
    val_batch_size: int = 500
    test_eval: bool = True  # evaluate the best checkpoint on the test split at the end
    progress: bool = True
    init_from: str | None = None  # start from this checkpoint's weights (a fine-tuning stage)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown training config fields {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)


def lr_at(cfg: TrainConfig, progress_frac: float, step: int) -> float:
    """Learning rate after ``step`` steps with ``progress_frac`` (0..1) of the schedule used."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    cos = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_frac)))
    return cfg.lr * warm * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cos)


def perturb(x: Tensor, rate: float, levels: int) -> Tensor:
    """Replace each sub-pixel by a uniform random level with probability ``rate`` (Ren et al. 2019)."""
    if rate <= 0:
        return x
    mask = torch.rand(x.shape, device=x.device) < rate
    noise = torch.randint(0, levels, x.shape, device=x.device, dtype=x.dtype)
    return torch.where(mask, noise, x)


def split_data(spec: str) -> tuple[ImageDataset, ImageDataset, ImageDataset | None]:
    """(train, valid, test) for a spec: named datasets use their fixed splits; files are split here."""
    name = spec.partition(":")[0]
    if name in ("npz", "folder"):
        full = load_dataset(spec)
        tr, va = validation_indices(len(full))
        sub = lambda idx, tag: ImageDataset(  # noqa: E731
            full.images[idx], full.labels[idx] if full.labels is not None else None, full.classes, f"{spec}#{tag}"
        )
        return sub(tr, "train"), sub(va, "valid"), None
    return load_dataset(f"{name}:train"), load_dataset(f"{name}:valid"), load_dataset(f"{name}:test")


def new_state() -> dict[str, Any]:
    """The resumable state of a run not yet started (``elapsed`` in seconds; see ``RunState.st``)."""
    return {
        "epoch": 0,
        "step_in_epoch": 0,
        "global_step": 0,
        "elapsed": 0.0,
        "best_val_bpd": None,
        "history": [],
    }


class EMA:
    """Exponential moving average of floating-point parameters and buffers."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].lerp_(v.float(), 1.0 - self.decay)
            else:
                self.shadow[k].copy_(v)


@dataclass
class RunState:
    """What one training run carries from step to step (one process of a distributed run)."""

    model: DensityModel
    net: torch.nn.Module  # the model, or its DistributedDataParallel wrapper
    opt: torch.optim.Optimizer
    ema: EMA | None
    st: dict[str, Any]  # resumable: epoch, step_in_epoch, global_step, elapsed (s), best_val_bpd, history
    images: Tensor  # (N, C, H, W) training images on the device
    labels: Tensor | None  # (N,) class labels, conditional models only
    steps_per_epoch: int
    total_steps: int
    t_start: float  # time.time() at the start, moved back by the seconds a resumed run already used
    last_save: float  # time.time() of the last resume-state save
    out_of_time: bool = False
