"""GET / (the web page) and /static/ (its CSS and JavaScript modules), served without an API key.

The page is plain files in ``static/``: no build step, nothing fetched from elsewhere (the Content
Security Policy below forbids it). It calls the API with relative URLs (``models``, ``score``, ...),
so it works unchanged behind a reverse proxy that serves the app under a path prefix such as
``/genserve/``. The key a person types is kept in the tab's sessionStorage and sent as ``X-API-Key``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response

STATIC_DIR = Path(__file__).parent / "static"
# Everything from this server; images also from data: and blob: URLs the page makes itself.
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate (ETag), so a new release's page is never mixed with old modules
}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)


class PageFiles(StaticFiles):
    """StaticFiles with the page's headers on every file."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(HEADERS)
        return response


def install(app: FastAPI) -> None:
    """Serve the page at ``/`` and its files under ``/static/``."""
    app.include_router(router)
    app.mount("/static", PageFiles(directory=STATIC_DIR), name="web-static")
