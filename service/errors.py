"""Errors the serving core raises for the client to fix (or to retry); app.py turns them into JSON.

Each carries the HTTP status and a ``detail`` that says what to do, so the registry, the batcher
and the image decoder need not import the web framework.
"""

from __future__ import annotations


class ServiceError(Exception):
    """A request the service will not serve as sent; ``detail`` tells the client why and what to do."""

    status_code = 400

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers


class BadRequest(ServiceError):
    """The request is well-formed JSON but its values do not fit the model (422)."""

    status_code = 422


class UnknownModel(ServiceError):
    status_code = 404


class PayloadTooLarge(ServiceError):
    status_code = 413


class UnsupportedMediaType(ServiceError):
    status_code = 415


class Unavailable(ServiceError):
    """Not ready, overloaded or shutting down: retry later (503 with Retry-After)."""

    status_code = 503

    def __init__(self, detail: str, *, retry_after_s: int = 1) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after_s)})


class Timeout(ServiceError):
    status_code = 504
