"""POST /sample: draw images from a model, as base64 PNGs in JSON or one PNG grid."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from service import images
from service.deps import AppMetrics, Registry
from service.disconnect import unless_disconnected
from service.samples import CheckedSample, sample_response
from service.schemas import MODEL_ERRORS, SampleResponse

router = APIRouter(tags=["sample"])


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
    responses={**MODEL_ERRORS, 200: {"content": {"image/png": {}}, "description": "samples as JSON, or a PNG grid"}},
)
async def sample(
    call: CheckedSample, request: Request, registry: Registry, metrics: AppMetrics
) -> SampleResponse | Response:
    entry = call.entry
    work = registry.sample(entry, n=call.n, seed=call.seed, temperature=call.temperature, label=call.label)
    result = await unless_disconnected(request, work)
    metrics.images_sampled.labels(model=entry.name).inc(call.n)
    if wants_png(request.headers.get("accept", "")):
        pixels = images.from_levels(result.images.numpy(), entry.levels)  # (n, C, H, W) uint8
        grid = await run_in_threadpool(images.png_grid, pixels)
        return Response(grid, media_type="image/png", headers={"X-Seed": str(call.seed)})
    return await run_in_threadpool(sample_response, call, result)
