"""POST /admin/models/{name}/load, /reload and /unload: change the served versions (docs/lifecycle.md)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from service.admin_auth import require_admin_key
from service.lifecycle import Lifecycle
from service.lifecycle_schemas import AdminResult
from service.schemas import ErrorResponse

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin_key)])

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "missing or invalid admin key"},
    403: {"model": ErrorResponse, "description": "the admin API is off (GENSERVE_ADMIN_KEYS is empty)"},
    404: {"model": ErrorResponse, "description": "the model is not served (reload, unload)"},
    409: {"model": ErrorResponse, "description": "the new version failed a check; the serving version stays"},
}


async def get_lifecycle(request: Request) -> Lifecycle:
    lifecycle: Lifecycle = request.app.state.lifecycle
    return lifecycle


Manager = Annotated[Lifecycle, Depends(get_lifecycle)]


@router.post("/models/{name}/load", response_model=AdminResult, summary="Serve a model folder", responses=ERRORS)
async def load(name: str, lifecycle: Manager) -> AdminResult:
    """Load ``<GENSERVE_MODEL_DIR>/<name>`` (a reload if it is served already)."""
    return await lifecycle.load(name)


@router.post(
    "/models/{name}/reload", response_model=AdminResult, summary="Swap in the folder's version", responses=ERRORS
)
async def reload(
    name: str, lifecycle: Manager, force: bool = Query(False, description="reload even if the files are unchanged")
) -> AdminResult:
    """Load the folder's version beside the serving one, check and warm it up, route new requests to
    it, and close the old one once its requests are done; a version failing a check is refused (409)."""
    return await lifecycle.reload(name, force=force)


@router.post("/models/{name}/unload", response_model=AdminResult, summary="Stop serving a model", responses=ERRORS)
async def unload(
    name: str,
    lifecycle: Manager,
    wait: bool = Query(True, description="answer after the requests in flight have finished and its workers closed"),
) -> AdminResult:
    """New requests get 404 at once; the requests in flight finish; then its workers close."""
    return await lifecycle.unload(name, wait=wait)
