"""The peak check (models/scoring/peak.py): fitted on calibration images, it refuses an image whose
brightest pixel is more than its tolerance below theirs, in 8-bit levels whatever the model's levels."""

from __future__ import annotations

import numpy as np
import pytest

from models.scoring.peak import PeakCheck, peak_check_for, peak_levels


def test_fit_reads_the_dimmest_peak_and_refuses_below_it_by_more_than_the_tolerance():
    x = np.zeros((3, 1, 4, 4), np.uint8)
    x[0, 0, 0, 0], x[1, 0, 2, 1], x[2, 0, 3, 3] = 255, 230, 250
    check = PeakCheck.fit(x, 256, tolerance=30)
    assert check.min_level == 230 and check.floor == 200
    assert not check.crossed(200) and check.crossed(199)
    assert check.result(120) == {"level": 120, "floor": 200, "min_level": 230, "crossed": True}
    assert PeakCheck.from_json(check.to_json()) == check
    assert peak_check_for({"calibration": {"peak": check.to_json()}}) == check
    assert peak_check_for({"calibration": {"scores": {}}}) is None and peak_check_for({}) is None


def test_peaks_are_in_8bit_levels_for_any_number_of_levels_and_channels():
    x = np.zeros((2, 3, 2, 2), np.uint8)
    x[0, 2, 1, 1] = 3  # levels 0..3: the top level is white
    x[1, 0, 0, 0] = 1
    assert peak_levels(x, 4).tolist() == [255, 85]
    assert peak_levels(np.zeros((0, 1, 2, 2), np.uint8), 256).size == 0


def test_a_check_without_room_refuses_nothing_and_bad_entries_are_refused():
    dim = PeakCheck.fit(np.full((5, 1, 2, 2), 40, np.uint8), 256)  # data that never reach white
    assert dim.floor < 0 and not dim.crossed(0)
    with pytest.raises(ValueError, match="min_level"):
        PeakCheck(min_level=256)
    with pytest.raises(ValueError, match="tolerance"):
        PeakCheck(min_level=255, tolerance=-1)
    with pytest.raises(ValueError, match="at least one"):
        PeakCheck.fit(np.zeros((0, 1, 2, 2), np.uint8), 256)
