"""The peak check: refuse an image whose brightest pixel is far dimmer than any calibration image's.

Some training sets fix an image's range: every one of Fashion-MNIST's 70,000 images has its
brightest pixel at 254 or 255 (its preprocessing stretched each image's intensities to the full
range). The density models learn the shapes, not that rule, and a dim image (light strokes on a
dark ground shrunk to 28x28, where a one-pixel pen line becomes a faint gray trace; a dark
photograph in gray) can look to them like a garment on black. The check reads the rule from the
calibration data instead of assuming it: ``min_level`` is the lowest brightest-pixel value among the
calibration images (8-bit levels), and an image whose brightest pixel is below ``min_level -
tolerance`` is refused whatever its score. For data without such a rule (a set with dim images)
``min_level`` is low and the check refuses nothing, or only the nearly black.

It adds at most the chance that a fresh in-distribution image is dimmer than every one of the n
calibration images by ``tolerance`` levels (below 1/(n + 1) before the tolerance; none of
Fashion-MNIST's 10,000 test images and 55,000 training images is below 254). The tolerance (64
levels by default) leaves room for what a pipeline does to an image: of 5,000 validation images
saved as JPEG of quality 70-95 or upscaled and decoded back to 28x28 (``genserve calibrate
--reencode``'s images), two fall below 254 - 64 = 190 (the dimmest: 186; bench/peak_levels.py,
docs/ood.md "Session 18"). Part of a model's calibration
(``calibration.peak`` in model.json); it applies to every image ``/score`` and ``/classify`` judge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from models.image_convert import from_levels

DEFAULT_TOLERANCE = 64  # 8-bit levels below the calibration images' dimmest peak that are still accepted


def peak_levels(images: np.ndarray, levels: int) -> np.ndarray:
    """(N,) int: each image's brightest sub-pixel in 8-bit levels, of integer levels (N, C, H, W)."""
    eight = from_levels(np.asarray(images), levels)
    return eight.reshape(len(eight), -1).max(axis=1).astype(np.int64) if eight.size else np.zeros(0, np.int64)


@dataclass(frozen=True)
class PeakCheck:
    """Refuse an image whose brightest pixel is below ``min_level - tolerance`` (8-bit levels)."""

    min_level: int
    tolerance: int = DEFAULT_TOLERANCE

    def __post_init__(self) -> None:
        if not 0 <= self.min_level <= 255:
            raise ValueError(f"peak min_level must lie in 0..255, got {self.min_level}")
        if not 0 <= self.tolerance <= 255:
            raise ValueError(f"peak tolerance must lie in 0..255 levels, got {self.tolerance}")

    @classmethod
    def fit(cls, images: np.ndarray, levels: int, tolerance: int = DEFAULT_TOLERANCE) -> PeakCheck:
        """The check of calibration images (N, C, H, W) integer levels: the dimmest one's peak."""
        peaks = peak_levels(images, levels)
        if not peaks.size:
            raise ValueError("the peak check needs at least one calibration image")
        return cls(min_level=int(peaks.min()), tolerance=tolerance)

    @property
    def floor(self) -> int:
        """The lowest brightest-pixel value accepted, 8-bit levels."""
        return self.min_level - self.tolerance

    def crossed(self, level: int) -> bool:
        """True when an image's brightest pixel (8-bit) is below the floor."""
        return level < self.floor

    def result(self, level: int) -> dict[str, Any]:
        """What ``/score`` reports for one image: its peak, the floor and whether it fell below it."""
        return {"level": level, "floor": self.floor, "min_level": self.min_level, "crossed": self.crossed(level)}

    def to_json(self) -> dict[str, Any]:
        return {
            "min_level": self.min_level,
            "tolerance": self.tolerance,
            "description": (
                "refuse an image whose brightest pixel (8-bit) is below min_level - tolerance; min_level: the "
                "dimmest brightest-pixel among the calibration images"
            ),
        }

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> PeakCheck:
        return cls(min_level=int(entry["min_level"]), tolerance=int(entry["tolerance"]))


def peak_check_for(meta: dict[str, Any]) -> PeakCheck | None:
    """The peak check of a model's calibration (model.json), or None where it has none."""
    entry = (meta.get("calibration") or {}).get("peak")
    return None if entry is None else PeakCheck.from_json(entry)
