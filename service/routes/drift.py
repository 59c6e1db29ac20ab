"""GET /models/{name}/drift: the drift tests of a model's recent /score uploads (docs/drift.md)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from service.deps import AppSettings, Registry
from service.drift_monitor import DriftMonitors
from service.lifecycle_schemas import DriftResponse
from service.schemas import ErrorResponse

router = APIRouter(tags=["models"])


def monitors(request: Request) -> DriftMonitors:
    drift: DriftMonitors = request.app.state.drift
    return drift


@router.get(
    "/models/{name}/drift",
    response_model=DriftResponse,
    summary="Drift of a model's recent uploads",
    description=(
        "Over the last GENSERVE_DRIFT_WINDOW uploads scored with the model's calibrated default score "
        "(none older than GENSERVE_DRIFT_MAX_AGE_S): the flagged fraction with an exact one-sided binomial "
        "test against the calibrated false-positive rate, and a Kolmogorov-Smirnov test of the scores "
        "against the calibration scores."
    ),
    responses={404: {"model": ErrorResponse, "description": "no such model; the detail lists the served ones"}},
)
async def drift(name: str, request: Request, registry: Registry, settings: AppSettings) -> DriftResponse:
    entry = registry.get(name)
    request.state.model = entry.name
    stats = monitors(request).stats(entry)
    common: dict[str, Any] = {
        "model": entry.name, "window_size": settings.drift_window, "max_age_s": settings.drift_max_age_s
    }  # fmt: skip
    if stats is None:
        return DriftResponse(
            **common, score_type=None, calibrated=False, uploads=0, flagged=0, flagged_fraction=None,
            expected_fraction=0.0, binomial_p_value=None, ks_statistic=None, ks_p_value=None,
            alpha=settings.drift_alpha, drift=False,
        )  # fmt: skip
    return DriftResponse(
        **common,
        score_type=entry.default_score_type,
        calibrated=True,
        uploads=stats.uploads,
        flagged=stats.flagged,
        flagged_fraction=stats.flagged_fraction,
        expected_fraction=stats.expected_fraction,
        binomial_p_value=stats.binomial_p_value,
        ks_statistic=stats.ks_statistic,
        ks_p_value=stats.ks_p_value,
        alpha=stats.alpha,
        drift=stats.drift,
    )
