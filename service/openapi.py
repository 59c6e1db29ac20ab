"""The OpenAPI document at /openapi.json says what this server answers, as configured.

FastAPI documents each route's own responses. What the app adds around the routes is added here,
so that a client generated from the document (or a fuzzer such as schemathesis) meets no status it
was not told of:

- every error's body is ``ErrorResponse``: ``detail`` is a string, or FastAPI's list of field
  errors for a request that fails validation (FastAPI documents only the list);
- 400 for a body that is not the JSON or multipart it says it is, 408 for one that did not arrive
  within GENSERVE_BODY_TIMEOUT_S, 413 for one over GENSERVE_MAX_UPLOAD_BYTES and 503 beyond
  GENSERVE_MAX_CONCURRENT_REQUESTS (POST routes; the middlewares in ``service/limits.py``), and
  500 with a ``request_id`` anywhere;
- security schemes and 401 only where keys are checked: nowhere without GENSERVE_API_KEYS, and not
  on /metrics with GENSERVE_METRICS_PUBLIC;
- the request limits this server was started with: ``n`` at most GENSERVE_MAX_SAMPLES, ``images``
  and ``files`` at most GENSERVE_MAX_IMAGES items;
- the names of the models it serves, as the ``enum`` of every ``model`` field and of
  ``/models/{name}`` (so /docs offers them in a list).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from service.schemas import ErrorResponse
from service.settings import Settings

COMPONENTS = "#/components/schemas/"
ERROR_REF = COMPONENTS + "ErrorResponse"
FASTAPI_422_REF = COMPONENTS + "HTTPValidationError"
METHODS = ("get", "put", "post", "delete", "patch", "options", "head")


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": ERROR_REF}}}}


POST_ERRORS = {
    "400": _error("the body is not valid JSON or multipart/form-data (as its Content-Type says)"),
    "408": _error("the body did not arrive within GENSERVE_BODY_TIMEOUT_S of the headers"),
    "413": _error("the body is over GENSERVE_MAX_UPLOAD_BYTES"),
    "503": _error("busy (GENSERVE_MAX_CONCURRENT_REQUESTS, a full queue) or still loading; retry after Retry-After"),
}
SERVER_ERROR = _error("unexpected; quote the request_id when reporting it (the log line carries the traceback)")
UNAUTHORIZED = _error("missing or invalid API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'")


def _keys_checked(path: str, operation: dict[str, Any], settings: Settings) -> bool:
    if "security" not in operation or not settings.api_key_list:
        return False
    return not (path == "/metrics" and settings.metrics_public)


def _describe_body(body: dict[str, Any], settings: Settings, models: list[str]) -> None:
    """Write the configured per-request limits and the served models into one request body's
    schema (in place)."""
    props = body.get("properties", {})
    if "model" in props and models:
        props["model"]["enum"] = models
    if "n" in props:
        props["n"]["maximum"] = settings.max_samples
    for name in ("images", "files"):
        if name in props:
            props[name]["maxItems"] = settings.max_images


def _complete_operation(
    path: str, method: str, operation: dict[str, Any], schemas: dict[str, Any], settings: Settings, models: list[str]
) -> None:
    """One operation of the document: its error bodies, the app's statuses, limits, models, security."""
    responses = operation.setdefault("responses", {})
    for response in responses.values():
        for media in response.get("content", {}).values():
            if media.get("schema", {}).get("$ref") == FASTAPI_422_REF:
                media["schema"] = {"$ref": ERROR_REF}
    for media in operation.get("requestBody", {}).get("content", {}).values():
        body = media.get("schema", {})
        ref = body.get("$ref", "")
        _describe_body(schemas[ref.rsplit("/", 1)[1]] if ref.startswith(COMPONENTS) else body, settings, models)
    for parameter in operation.get("parameters", []):
        if path == "/models/{name}" and parameter["name"] == "name" and models:
            parameter["schema"]["enum"] = models
    if method == "post":
        for status, response in POST_ERRORS.items():
            responses.setdefault(status, response)
    responses.setdefault("500", SERVER_ERROR)
    if _keys_checked(path, operation, settings):
        responses.setdefault("401", UNAUTHORIZED)
    else:
        operation.pop("security", None)


def complete(schema: dict[str, Any], settings: Settings, models: list[str]) -> dict[str, Any]:
    """Add the app-wide responses, the limits and ``models`` (the served names; none: say nothing of
    them) to ``schema`` (FastAPI's document, changed in place) and return it."""
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    error_schema = ErrorResponse.model_json_schema(ref_template=COMPONENTS + "{model}")
    for name, definition in error_schema.pop("$defs", {}).items():
        schemas.setdefault(name, definition)
    schemas.setdefault("ErrorResponse", error_schema)
    for path, item in schema.get("paths", {}).items():
        for method in METHODS:
            if method in item:
                _complete_operation(path, method, item[method], schemas, settings, models)
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    if not settings.api_key_list:
        components.pop("securitySchemes", None)
    return schema


def install(app: FastAPI, settings: Settings) -> None:
    """Serve :func:`complete`'s document at /openapi.json and /docs, built once, on first use:
    after the lifespan has found the models (no request is served before)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = complete(build(), settings, sorted(app.state.registry.entries))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
