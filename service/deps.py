"""FastAPI dependencies: the app's settings, registry and metrics, as ``Annotated`` aliases for routes.

All ``async``: FastAPI runs a plain ``def`` dependency in its thread pool, a thread hop per
dependency per request (service/offload.py).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.metrics import Metrics
from service.registry import ModelRegistry
from service.settings import Settings


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_registry(request: Request) -> ModelRegistry:
    registry: ModelRegistry = request.app.state.registry
    return registry


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


AppSettings = Annotated[Settings, Depends(get_settings)]
Registry = Annotated[ModelRegistry, Depends(get_registry)]
AppMetrics = Annotated[Metrics, Depends(get_metrics)]
