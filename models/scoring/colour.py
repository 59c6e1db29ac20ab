"""The colour check: a model of grayscale images refuses uploads in colour.

A model with one input channel was trained, validated and calibrated on grayscale images, so no
amount of colour is in its training distribution; the conversion to its input (luma,
:mod:`models.image_convert`) throws the colour away, and with it the plainest evidence that an
icon, an emoji, a logo or a photograph is not one of its images. Its statistics judge what is left,
and a coloured object centred on a dark background can look like a garment to them. The check
measures the colour on the file as decoded (:func:`models.image_convert.colour_fraction`: the
fraction of pixels whose chroma max(R,G,B) - min(R,G,B) exceeds ``tolerance`` levels) and refuses
the image when that fraction exceeds ``max_fraction``.

It is part of a model's calibration (``calibration.colour`` in model.json, written by ``genserve
calibrate`` for one-channel models, omitted with ``--no-colour-check``) and it cannot raise the
false-positive rate measured on the in-distribution data: their images have no colour channel
(fraction 0). The tolerance leaves room for what a grayscale picture picks up on its way to a user:
JPEG's chroma noise, a faint tint from a scanner (a few levels). Arrays sent without a file (the
offline tools' data sets) carry no colour and are not checked. Models of colour images have no
colour check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEFAULT_TOLERANCE = 32  # levels of 255: chroma at most this counts as gray
DEFAULT_MAX_FRACTION = 0.01  # of the file's pixels


@dataclass(frozen=True)
class ColourCheck:
    """Refuse an upload when more than ``max_fraction`` of its pixels have a chroma above ``tolerance``."""

    tolerance: int = DEFAULT_TOLERANCE
    max_fraction: float = DEFAULT_MAX_FRACTION

    def __post_init__(self) -> None:
        if not 0 <= self.tolerance < 255:
            raise ValueError(f"colour tolerance must lie in 0..254 levels, got {self.tolerance}")
        if not 0.0 <= self.max_fraction < 1.0:
            raise ValueError(f"colour max_fraction must lie in [0, 1), got {self.max_fraction}")

    def crossed(self, fraction: float | None) -> bool:
        """True when a file's colour fraction (None: no file, not checked) is over the limit."""
        return fraction is not None and fraction > self.max_fraction

    def result(self, fraction: float) -> dict[str, Any]:
        """What ``/score`` reports for one file: its fraction, the limits and whether it crossed them."""
        return {
            "fraction": fraction,
            "tolerance": self.tolerance,
            "max_fraction": self.max_fraction,
            "crossed": self.crossed(fraction),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "tolerance": self.tolerance,
            "max_fraction": self.max_fraction,
            "description": (
                "refuse an upload when more than max_fraction of its pixels have a chroma max(R,G,B) - "
                "min(R,G,B) above tolerance (8-bit levels): the model was trained on grayscale images"
            ),
        }

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> ColourCheck:
        return cls(tolerance=int(entry["tolerance"]), max_fraction=float(entry["max_fraction"]))


def colour_check_for(meta: dict[str, Any]) -> ColourCheck | None:
    """The colour check of a model's calibration (model.json), or None where it has none."""
    entry = (meta.get("calibration") or {}).get("colour")
    return None if entry is None else ColourCheck.from_json(entry)
