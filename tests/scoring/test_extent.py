"""The extent check (models/scoring/extent.py): fitted on calibration images, it refuses an image whose
object (its pixels above the check's level, in 8-bit levels whatever the model's levels) spans more
than its tolerance fewer pixels of the frame than any of theirs."""

from __future__ import annotations

import numpy as np
import pytest

from models.scoring.extent import ExtentCheck, extent_check_for, extents


def box(n: int, top: int, left: int, h: int, w: int, value: int = 255, size: int = 10) -> np.ndarray:
    x = np.zeros((n, 1, size, size), np.uint8)
    x[:, 0, top : top + h, left : left + w] = value
    return x


def test_the_extent_is_the_larger_side_of_the_box_of_pixels_above_the_level():
    x = np.concatenate([box(1, 2, 3, 4, 2), box(1, 0, 0, 1, 10), box(1, 0, 0, 0, 0), box(1, 5, 5, 1, 1)])
    assert extents(x, 256).tolist() == [4, 10, 0, 1]
    x[0, 0, 9, 9] = 3  # a faint pixel far off (a resampler's ringing) counts only above the level
    assert extents(x, 256)[0] == 4 and extents(x, 256, level=2)[0] == 8 and extents(x, 256, level=3)[0] == 4
    x[0, 0, 9, 9] = 5  # brighter noise or a gray ground widens the box
    assert extents(x, 256)[0] == 8
    colour = np.zeros((1, 3, 6, 6), np.uint8)
    colour[0, 2, 1, 1], colour[0, 0, 4, 2] = 9, 9  # any channel counts
    assert extents(colour, 256).tolist() == [4]
    two = np.zeros((1, 1, 6, 6), np.uint8)
    two[0, 0, 0, 0], two[0, 0, 5, 5] = 1, 1  # levels 0..1: 1 is white
    assert extents(two, 2).tolist() == [6]
    assert extents(np.zeros((0, 1, 4, 4), np.uint8), 256).size == 0


def test_fit_reads_the_smallest_extent_and_refuses_below_it_by_more_than_the_tolerance():
    x = np.concatenate([box(3, 0, 0, 10, 4), box(1, 1, 1, 9, 9)])
    check = ExtentCheck.fit(x, 256, tolerance=2)
    assert check.min_extent == 9 and check.floor == 7
    assert not check.crossed(7) and check.crossed(6)
    assert check.result(3) == {"pixels": 3, "floor": 7, "min_extent": 9, "crossed": True}
    assert ExtentCheck.from_json(check.to_json()) == check
    assert extent_check_for({"calibration": {"extent": check.to_json()}}) == check
    assert extent_check_for({"calibration": {"scores": {}}}) is None and extent_check_for({}) is None


def test_data_with_small_objects_make_a_check_that_refuses_nothing_and_bad_entries_are_refused():
    small = ExtentCheck.fit(np.concatenate([box(4, 0, 0, 10, 10), box(1, 4, 4, 1, 1)]), 256)
    assert small.floor < 0 and not small.crossed(0)
    with pytest.raises(ValueError, match="min_extent"):
        ExtentCheck(min_extent=-1)
    with pytest.raises(ValueError, match="tolerance"):
        ExtentCheck(min_extent=9, tolerance=-1)
    with pytest.raises(ValueError, match="level"):
        ExtentCheck(min_extent=9, level=255)
    with pytest.raises(ValueError, match="at least one"):
        ExtentCheck.fit(np.zeros((0, 1, 2, 2), np.uint8), 256)
