"""API keys: ``Authorization: Bearer KEY`` or ``X-API-Key: KEY`` when GENSERVE_API_KEYS is set.

The security schemes are FastAPI's, so /docs shows an "Authorize" button. Keys are compared with
``hmac.compare_digest`` against every configured key (no early exit), so timing says nothing about them.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

bearer = HTTPBearer(auto_error=False, description="GENSERVE_API_KEYS entry as a bearer token")
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="GENSERVE_API_KEYS entry")


def key_matches(given: str, keys: list[str]) -> bool:
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given.encode(), key.encode())
    return ok


def check_key(request: Request, credentials: HTTPAuthorizationCredentials | None, header_key: str | None) -> None:
    keys: list[str] = request.app.state.settings.api_key_list
    if not keys:
        return
    given = [credentials.credentials if credentials is not None else None, header_key]
    if any(g and key_matches(g, keys) for g in given):
        return
    raise HTTPException(
        status_code=401,
        detail="missing or invalid API key; send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
        headers={"WWW-Authenticate": "Bearer"},
    )


async def require_api_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    header_key: Annotated[str | None, Depends(api_key_header)],
) -> None:
    """Dependency for every protected router."""
    check_key(request, credentials, header_key)


async def require_api_key_for_metrics(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    header_key: Annotated[str | None, Depends(api_key_header)],
) -> None:
    """Like :func:`require_api_key`, unless GENSERVE_METRICS_PUBLIC opens /metrics to scrapers."""
    if not request.app.state.settings.metrics_public:
        check_key(request, credentials, header_key)
