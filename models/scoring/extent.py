"""The extent check: refuse an image whose object spans far less of the frame than any calibration image's.

Some training sets fix how an object fills its frame: Fashion-MNIST's images were made by trimming
each product photograph to the product and scaling its longer side to 28 pixels, so the pixels that
are not background span at least 26 of the 28 rows or columns in every one of its 70,000 images. The
density models learn the shapes, not that rule, and a light mark drawn small on a clean black ground
(a white letter or logo with margins, shrunk to 28x28) can look to them like a garment. The check
reads the rule from the calibration data instead of assuming it: an image's *extent* is the larger
side, in pixels, of the bounding box of its pixels brighter than ``level`` (8-bit, any channel);
``min_extent`` is the smallest extent among the calibration images, and an image whose extent is
below ``min_extent - tolerance`` is refused whatever its score. Data without such a rule make a
check that refuses little: MNIST's digits sit in a 20x20 box, so a check fitted on them would
refuse only marks spanning under about 17 pixels.

Only margins that are background count against an image: pixels at ``level`` 4 or below by default,
so the faint ringing of a resampling filter around a shrunk mark (Lanczos leaves levels 1 to 3 a few
pixels out) does not widen the box, while noise, JPEG artefacts above that or a gray ground do. What
a pipeline does to an image can only raise its extent: of 5,000 validation images re-encoded as
``genserve calibrate --reencode`` does, none spans fewer than 26 (bench/peak_levels.py). A fresh
in-distribution image is refused only if it spans more than ``tolerance`` pixels less than every one
of the n calibration images (none of Fashion-MNIST's 70,000 images spans fewer than 26 at levels 0
to 4). Part of a model's calibration (``calibration.extent`` in model.json); it applies to every
image ``/score`` and ``/classify`` judge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from models.image_convert import from_levels

DEFAULT_TOLERANCE = 2  # pixels below the calibration images' smallest extent that are still accepted
DEFAULT_LEVEL = 4  # 8-bit: pixels above it are the object's; at or below it, background (and a resampler's ringing)


def extents(images: np.ndarray, levels: int, level: int = DEFAULT_LEVEL) -> np.ndarray:
    """(N,) int: for integer levels (N, C, H, W), the larger side in pixels of the bounding box of each
    image's pixels brighter than ``level`` (8-bit) in any channel; 0 for an image with none."""
    eight = from_levels(np.asarray(images), levels)
    if not eight.size:
        return np.zeros(0, np.int64)
    mask: np.ndarray = np.asarray((eight > level).any(axis=1))  # (N, H, W)

    def span(hit: np.ndarray) -> np.ndarray:  # (N, L) bool -> (N,) first-to-last length, 0 where none
        first = hit.argmax(axis=1)
        last = hit.shape[1] - 1 - hit[:, ::-1].argmax(axis=1)
        return np.where(hit.any(axis=1), last - first + 1, 0)

    rows, cols = np.asarray(mask.any(axis=2)), np.asarray(mask.any(axis=1))
    return np.maximum(span(rows), span(cols)).astype(np.int64)


@dataclass(frozen=True)
class ExtentCheck:
    """Refuse an image whose extent (pixels, above ``level``) is below ``min_extent - tolerance``."""

    min_extent: int
    tolerance: int = DEFAULT_TOLERANCE
    level: int = DEFAULT_LEVEL

    def __post_init__(self) -> None:
        if self.min_extent < 0:
            raise ValueError(f"extent min_extent must be 0 or more pixels, got {self.min_extent}")
        if self.tolerance < 0:
            raise ValueError(f"extent tolerance must be 0 or more pixels, got {self.tolerance}")
        if not 0 <= self.level <= 254:
            raise ValueError(f"extent level must lie in 0..254, got {self.level}")

    @classmethod
    def fit(
        cls, images: np.ndarray, levels: int, tolerance: int = DEFAULT_TOLERANCE, level: int = DEFAULT_LEVEL
    ) -> ExtentCheck:
        """The check of calibration images (N, C, H, W) integer levels: the least-spanning one's extent."""
        spans = extents(images, levels, level)
        if not spans.size:
            raise ValueError("the extent check needs at least one calibration image")
        return cls(min_extent=int(spans.min()), tolerance=tolerance, level=level)

    @property
    def floor(self) -> int:
        """The smallest extent accepted, pixels."""
        return self.min_extent - self.tolerance

    def crossed(self, extent: int) -> bool:
        """True when an image's extent is below the floor."""
        return extent < self.floor

    def result(self, extent: int) -> dict[str, Any]:
        """What ``/score`` reports for one image: its extent, the floor and whether it fell below it."""
        return {"pixels": extent, "floor": self.floor, "min_extent": self.min_extent, "crossed": self.crossed(extent)}

    def to_json(self) -> dict[str, Any]:
        return {
            "min_extent": self.min_extent,
            "tolerance": self.tolerance,
            "level": self.level,
            "description": (
                "refuse an image whose extent (the larger side, in pixels, of the bounding box of its pixels above "
                "level, 8-bit) is below min_extent - tolerance; min_extent: the smallest extent among the "
                "calibration images"
            ),
        }

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> ExtentCheck:
        return cls(min_extent=int(entry["min_extent"]), tolerance=int(entry["tolerance"]), level=int(entry["level"]))


def extent_check_for(meta: dict[str, Any]) -> ExtentCheck | None:
    """The extent check of a model's calibration (model.json), or None where it has none."""
    entry = (meta.get("calibration") or {}).get("extent")
    return None if entry is None else ExtentCheck.from_json(entry)
