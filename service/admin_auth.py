"""Admin keys for /admin: ``Authorization: Bearer KEY`` or ``X-Admin-Key: KEY``, one of GENSERVE_ADMIN_KEYS.

Separate from the API keys: a client key never changes which models serve. With no admin key
configured the admin API is off (403), so an unconfigured service cannot be reloaded remotely.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials

from service.auth import bearer, key_matches

admin_key_header = APIKeyHeader(name="X-Admin-Key", auto_error=False, description="GENSERVE_ADMIN_KEYS entry")


async def require_admin_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    header_key: Annotated[str | None, Depends(admin_key_header)],
) -> None:
    """Dependency of the admin router: 403 while no admin key is configured, 401 without a valid one."""
    keys: list[str] = request.app.state.settings.admin_key_list
    if not keys:
        raise HTTPException(
            status_code=403, detail="the admin API is off; set GENSERVE_ADMIN_KEYS to enable it (docs/lifecycle.md)"
        )
    given = [credentials.credentials if credentials is not None else None, header_key]
    if not any(g and key_matches(g, keys) for g in given):
        raise HTTPException(
            status_code=401,
            detail="missing or invalid admin key; send 'X-Admin-Key: KEY' (or 'Authorization: Bearer KEY') with a "
            "GENSERVE_ADMIN_KEYS entry",
            headers={"WWW-Authenticate": "Bearer"},
        )
