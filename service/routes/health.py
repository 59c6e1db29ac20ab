"""Liveness (/healthz), readiness (/readyz) and Prometheus metrics (/metrics)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.auth import require_api_key_for_metrics
from service.deps import AppMetrics, Registry
from service.errors import Unavailable
from service.schemas import ErrorResponse, HealthResponse, ReadyResponse

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthResponse, summary="The process is alive")
async def healthz() -> HealthResponse:
    return HealthResponse()


@router.get(
    "/readyz",
    response_model=ReadyResponse,
    summary="Every model is loaded and warmed up",
    responses={503: {"model": ErrorResponse, "description": "still loading (or a model failed to load)"}},
)
async def readyz(registry: Registry) -> ReadyResponse:
    if not registry.ready:
        raise Unavailable(registry.not_ready_reason(), retry_after_s=2)
    return ReadyResponse(models=sorted(registry.entries))


@router.get(
    "/metrics",
    summary="Prometheus metrics (text format)",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}}},
    dependencies=[Depends(require_api_key_for_metrics)],
)
async def metrics(registry: Registry, metrics: AppMetrics) -> Response:
    return Response(metrics.render(registry.devices_in_process), media_type=CONTENT_TYPE_LATEST)
