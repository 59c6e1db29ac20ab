"""Response schemas of the drift monitor (GET /models/{name}/drift) and the admin API (/admin/...)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class DriftResponse(BaseModel):
    model: str
    score_type: str | None = Field(description="the calibrated default score the window holds; null if uncalibrated")
    calibrated: bool = Field(description="false: the model has no calibration, so nothing is monitored")
    uploads: int = Field(description="/score uploads in the window (at most GENSERVE_DRIFT_WINDOW)")
    window_size: int = Field(description="GENSERVE_DRIFT_WINDOW")
    max_age_s: float = Field(description="GENSERVE_DRIFT_MAX_AGE_S: older uploads have left the window")
    flagged: int = Field(description="uploads in the window flagged as outliers")
    flagged_fraction: float | None = Field(description="flagged / uploads")
    expected_fraction: float = Field(
        description="the binomial test's null rate: the calibrated false-positive rate (calibration.target_fpr) "
        "times GENSERVE_DRIFT_FPR_MARGIN"
    )
    binomial_p_value: float | None = Field(
        description="P(X >= flagged), X ~ Binomial(uploads, expected_fraction): one-sided exact test; null below "
        "GENSERVE_DRIFT_MIN_UPLOADS"
    )
    ks_statistic: float | None = Field(description="KS distance of the window's scores from the calibration scores")
    ks_p_value: float | None = Field(description="the KS test's p-value (asymptotic, two-sample effective size)")
    alpha: float = Field(description="GENSERVE_DRIFT_ALPHA")
    drift: bool = Field(description="true while either p-value is below alpha")


class AdminResult(BaseModel):
    model: str
    action: Literal["load", "reload", "unload"]
    result: Literal["loaded", "reloaded", "unchanged", "unloaded"]
    version: int | None = Field(description="the version now serving (null after an unload)")
    sha256: str | None = Field(description="sha256 of the weights now serving (null after an unload)")
    previous_sha256: str | None = Field(description="sha256 of the version it replaced, if any")
    seconds: float = Field(description="time to load, check and warm up the new version, and drain the old one")
