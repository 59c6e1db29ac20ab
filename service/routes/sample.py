"""POST /sample: draw images from a model, as base64 PNGs in JSON or one PNG grid."""

from __future__ import annotations

import secrets

import numpy as np
from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from models.likelihood import bits_per_dim
from service import images
from service.deps import AppMetrics, AppSettings, Registry
from service.disconnect import unless_disconnected
from service.errors import BadRequest
from service.schemas import ErrorResponse, SampleRequest, SampleResponse

router = APIRouter(tags=["sample"])

ERRORS: dict[int | str, dict[str, object]] = {
    404: {"model": ErrorResponse, "description": "unknown model"},
    503: {"model": ErrorResponse, "description": "the model's workers are busy or loading; see Retry-After"},
    504: {"model": ErrorResponse, "description": "not done within GENSERVE_REQUEST_TIMEOUT_S"},
}


def wants_png(accept: str) -> bool:
    """True if the Accept header prefers image/png to application/json (the default): ``image/*``
    counts for PNG unless image/png is named, ``application/*`` and ``*/*`` for JSON."""
    prefs: dict[str, float] = {}
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for p in params:
            if p.startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        prefs[media.lower()] = q
    png = prefs.get("image/png", prefs.get("image/*", 0.0))
    js = prefs.get("application/json", prefs.get("application/*", prefs.get("*/*", 0.0)))
    return png > 0 and png >= js


@router.post(
    "/sample",
    response_model=SampleResponse,
    summary="Draw images",
    description="Send `Accept: image/png` for one PNG grid of the samples (seed in the X-Seed header).",
    responses={**ERRORS, 200: {"content": {"image/png": {}}, "description": "samples as JSON, or a PNG grid"}},
)
async def sample(
    body: SampleRequest, request: Request, registry: Registry, settings: AppSettings, metrics: AppMetrics
) -> SampleResponse | Response:
    entry = registry.get(body.model)
    request.state.model = entry.name
    request.state.images = body.n
    if body.n > settings.max_samples:
        raise BadRequest(
            f"n={body.n} is over the limit of {settings.max_samples} samples per request (GENSERVE_MAX_SAMPLES)"
        )
    label = entry.label_index(body.label)
    seed = body.seed if body.seed is not None else secrets.randbelow(2**53)  # exact in JSON doubles too
    work = registry.sample(entry, n=body.n, seed=seed, temperature=body.temperature or 1.0, label=label)
    result = await unless_disconnected(request, work)
    metrics.images_sampled.labels(model=entry.name).inc(body.n)
    pixels = images.from_levels(result.images.numpy(), entry.levels)  # (n, C, H, W) uint8
    if wants_png(request.headers.get("accept", "")):
        grid = await run_in_threadpool(images.png_grid, pixels)
        return Response(grid, media_type="image/png", headers={"X-Seed": str(seed)})
    pngs = await run_in_threadpool(lambda: [images.b64(images.encode_png(p)) for p in pixels])
    log_prob = None if result.log_prob is None else result.log_prob.double()
    return SampleResponse(
        model=entry.name,
        seed=seed,
        label=label,
        images=pngs,
        bits_per_dim=None if log_prob is None else _floats(bits_per_dim(log_prob, entry.dims)),
        log_likelihood_nats=None if log_prob is None else _floats(log_prob),
    )


def _floats(t: object) -> list[float]:
    return [float(v) for v in np.asarray(t).reshape(-1)]
