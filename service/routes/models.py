"""GET /models and GET /models/{name}: what is served and what each model takes."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.deps import Registry
from service.schemas import ErrorResponse, ModelInfo, ModelList

router = APIRouter(tags=["models"])


@router.get("/models", response_model=ModelList, summary="List served models")
async def list_models(registry: Registry) -> ModelList:
    return ModelList(models=[ModelInfo(**e.info()) for e in registry.entries.values()])


@router.get(
    "/models/{name}",
    response_model=ModelInfo,
    summary="Describe one model",
    responses={404: {"model": ErrorResponse, "description": "no such model; the detail lists the served ones"}},
)
async def get_model(name: str, request: Request, registry: Registry) -> ModelInfo:
    entry = registry.get(name)
    request.state.model = entry.name
    return ModelInfo(**entry.info())
