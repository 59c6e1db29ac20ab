"""One served model as the service sees it (:class:`ModelEntry`): what its checkpoint says, built
without weights, and its workers; and the startup checks of a model folder."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.base import AutoregressiveModel, DensityModel
from models.checkpoint import META, CheckpointError, build_model, read_metadata
from models.scoring.calibration import default_score_type
from models.scoring.classify import training_prior
from models.scoring.colour import ColourCheck, colour_check_for
from models.scoring.dose import DoseFit
from models.scoring.extent import ExtentCheck, extent_check_for
from models.scoring.peak import PeakCheck, peak_check_for
from models.scoring.scorer import BACKGROUND, COMPANION, calibrated_dose, has_background, has_companion, has_dose
from models.scoring.scores import DOSE, GUARDED, available_score_types
from models.threads import on_passing_thread
from service.batching import Worker
from service.errors import BadRequest


class RegistryError(ValueError):
    """The configured models cannot be served; the message says how to fix the settings."""


@dataclass
class ModelEntry:
    """One served model: what its checkpoint says, and its workers."""

    name: str
    folder: Path
    meta: dict[str, Any]
    skeleton: DensityModel  # built on the "meta" device: properties only, no weights
    workers: list[Worker]
    background_meta: dict[str, Any] | None = None  # the background model in <folder>/background/, if any
    companion_meta: dict[str, Any] | None = None  # the companion model in <folder>/companion/, if any
    version: int = 1  # loads of this model in this process (service/lifecycle.py); its sha256 names it
    loaded_at: float = field(default_factory=time.time)  # Unix time its entry was built
    last_reload_error: str | None = None  # why the last load or reload of a newer version was refused
    holders: int = 0  # requests in flight that hold this entry (service/leases.py); drained at 0

    @property
    def sha256(self) -> str:
        return str(self.meta["weights"].get("sha256", ""))

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.skeleton.shape

    @property
    def levels(self) -> int:
        return self.skeleton.levels

    @property
    def dims(self) -> int:
        return self.skeleton.dims

    @property
    def n_classes(self) -> int | None:
        return self.skeleton.n_classes

    @property
    def per_pixel(self) -> bool:
        """True if the model gives per-pixel likelihoods (heatmaps)."""
        return isinstance(self.skeleton, AutoregressiveModel)

    @property
    def classes(self) -> list[str] | None:
        classes = (self.meta.get("dataset") or {}).get("classes")
        return [str(c) for c in classes] if classes else None

    @property
    def prior(self) -> list[float]:
        """p(y) of a class-conditional model: its training class frequencies (uniform if unrecorded)."""
        assert self.n_classes is not None
        return [float(p) for p in training_prior(self.meta, self.n_classes)]

    @property
    def score_types(self) -> list[str]:
        return available_score_types(has_background=self.background_meta is not None, has_dose=has_dose(self.meta))

    @functools.cached_property
    def dose_fit(self) -> DoseFit | None:
        """The dose score's fitted densities (parsed once), for /score's explanations."""
        return calibrated_dose(self.meta)

    @functools.cached_property
    def colour_check(self) -> ColourCheck | None:
        """The calibration's colour check of uploaded files (models of grayscale images only), parsed once."""
        return colour_check_for(self.meta) if self.shape[0] == 1 else None

    @functools.cached_property
    def peak_check(self) -> PeakCheck | None:
        """The calibration's peak check (models/scoring/peak.py), parsed once."""
        return peak_check_for(self.meta)

    @functools.cached_property
    def extent_check(self) -> ExtentCheck | None:
        """The calibration's extent check (models/scoring/extent.py), parsed once."""
        return extent_check_for(self.meta)

    @property
    def default_score_type(self) -> str:
        return default_score_type(self.meta, background=self.background_meta is not None)

    def info(self) -> dict[str, Any]:
        dataset = self.meta.get("dataset") or {}
        return {
            "name": self.name,
            "kind": self.skeleton.kind,
            "architecture": self.skeleton.architecture,
            "shape": list(self.shape),
            "levels": self.levels,
            "dataset": dataset.get("name") or dataset.get("spec"),
            "classes": self.classes,
            "metrics": self.meta.get("metrics") or {},
            "calibration": public_calibration(self.meta.get("calibration")),
            "sha256": self.sha256,
            "version": self.version,
            "loaded_at": self.loaded_at,
            "last_reload_error": self.last_reload_error,
            "devices": [w.device for w in self.workers],
            "pass_sizes": [w.pass_size for w in self.workers],
            "exact_likelihood": bool(self.skeleton.exact),
            "conditional": self.n_classes is not None,
            "score_types": self.score_types,
            "default_score_type": self.default_score_type,
            "background": None if self.background_meta is None else background_info(self.background_meta),
            "companion": None if self.companion_meta is None else companion_info(self.companion_meta),
        }

    def label_index(self, label: int | str | None, *, required: bool = True) -> int | None:
        """The class index for a request's label (a name or an index); 422 unless it fits the model
        (or, with ``required``, if a class-conditional model gets none)."""
        n = self.n_classes
        if n is None:
            if label is not None:
                raise BadRequest(f"model '{self.name}' is not class-conditional; remove 'label'")
            return None
        names = self.classes
        choices = f"one of {names} or an index 0..{n - 1}" if names else f"an index 0..{n - 1}"
        if label is None:
            if not required:
                return None
            raise BadRequest(f"model '{self.name}' is class-conditional; send 'label': {choices}")
        if isinstance(label, str):
            if names and label in names:
                return names.index(label)
            text = label.strip()
            if not (text.isascii() and text.isdigit()):  # "³" and "٣" are digits to str.isdigit
                raise BadRequest(f"label '{label}' is not a class of model '{self.name}'; send {choices}")
            label = int(text)
        if not 0 <= label < n:
            raise BadRequest(f"label {label} is out of range for model '{self.name}'; send {choices}")
        return label

    def resolve_score_type(self, requested: str | None, *, labelled: bool = False) -> str:
        """The score type a request gets: the one it names, else the default. ``dose`` judges p(x) and is
        calibrated without labels, so a labelled request (p(x|y)) that names none gets
        ``complexity_guarded`` (uncalibrated for p(x|y)), and one that names ``dose`` is refused."""
        name = requested or self.default_score_type
        if name not in self.score_types:
            raise BadRequest(f"unknown score_type '{name}'; model '{self.name}' offers {self.score_types}")
        if labelled and name == DOSE:
            if requested is not None:
                raise BadRequest(
                    "score_type 'dose' judges p(x), calibrated without labels; send no label, or another score_type"
                )
            return GUARDED
        return name


def public_calibration(cal: dict[str, Any] | None) -> dict[str, Any] | None:
    """What /models shows of a calibration: all of it but the dose score's fitted samples, precision
    matrix and reference normal scores (a megabyte), of which it keeps each statistic's name and tail
    and the neighbour count."""
    if not cal or "dose" not in cal:
        return cal or None
    dose = {k: v for k, v in cal["dose"].items() if k not in ("statistics", "mean", "precision", "reference")}
    dose["statistics"] = [
        {k: v for k, v in s.items() if k not in ("sample", "bandwidth")} for s in cal["dose"]["statistics"]
    ]
    return {**cal, "dose": dose}


def background_info(meta: dict[str, Any]) -> dict[str, Any]:
    """What /models says about a background model: architecture, size, perturbation, weights."""
    return {
        "architecture": meta.get("architecture"),
        "parameters": meta.get("parameters"),
        "perturb": (meta.get("dataset") or {}).get("perturb"),
        "sha256": meta["weights"].get("sha256", ""),
    }


def companion_info(meta: dict[str, Any]) -> dict[str, Any]:
    """What /models says about a companion model: architecture, size, training data, weights."""
    return {
        "architecture": meta.get("architecture"),
        "parameters": meta.get("parameters"),
        "dataset": (meta.get("dataset") or {}).get("name"),
        "sha256": meta["weights"].get("sha256", ""),
    }


def skeleton_model(folder: Path, meta: dict[str, Any]) -> DensityModel:
    """The model built from its config on the meta device: checks the config, costs no memory.

    Built on a thread of its own (:func:`models.threads.on_passing_thread`): its masks' arithmetic
    runs on the CPU, and must not leave an OpenMP pool on the server's long-lived threads."""

    def build() -> DensityModel:
        with torch.device("meta"):
            return build_model(meta["architecture"], meta["config"])

    try:
        return on_passing_thread(build)
    except (TypeError, ValueError) as e:
        raise RegistryError(f"{folder / META}: config does not build a model: {e}") from e


def background_metadata(folder: Path, skeleton: DensityModel) -> dict[str, Any] | None:
    """The metadata of ``folder``'s background model, None if it has none; RegistryError unless the
    background takes the model's images and is unconditional."""
    if not has_background(folder):
        return None
    bg_folder = folder / BACKGROUND
    try:
        meta = read_metadata(bg_folder)
    except CheckpointError as e:
        raise RegistryError(str(e)) from e
    bg = skeleton_model(bg_folder, meta)
    if bg.shape != skeleton.shape or bg.levels != skeleton.levels or bg.n_classes is not None:
        raise RegistryError(
            f"{bg_folder / META}: the background model takes {bg.shape} images with {bg.levels} levels"
            f"{' and labels' if bg.n_classes is not None else ''}; its model takes {skeleton.shape} with "
            f"{skeleton.levels}, unconditionally. Retrain it for this model or remove {bg_folder}"
        )
    return meta


def companion_metadata(folder: Path, skeleton: DensityModel) -> dict[str, Any] | None:
    """The metadata of ``folder``'s companion model, None if it has none; RegistryError unless the
    companion takes the model's images and is unconditional."""
    if not has_companion(folder):
        return None
    c_folder = folder / COMPANION
    try:
        meta = read_metadata(c_folder)
    except CheckpointError as e:
        raise RegistryError(str(e)) from e
    c = skeleton_model(c_folder, meta)
    if c.shape != skeleton.shape or c.levels != skeleton.levels or c.n_classes is not None:
        raise RegistryError(
            f"{c_folder / META}: the companion model takes {c.shape} images with {c.levels} levels"
            f"{' and labels' if c.n_classes is not None else ''}; its model takes {skeleton.shape} with "
            f"{skeleton.levels}, unconditionally. Install another (`genserve calibrate --companion`) or remove "
            f"{c_folder} and recalibrate"
        )
    return meta
