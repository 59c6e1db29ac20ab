"""POST /encode: a VAE's latent code q(z|x) = N(mean, diag(std^2)) per image, as features."""

from __future__ import annotations

import torch
from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from service.deps import AppMetrics, AppSettings, Registry
from service.disconnect import unless_disconnected
from service.errors import BadRequest
from service.routes.sample import ERRORS
from service.schemas import EncodeForm, EncodeRequest, EncodeResponse, EncodeResult, ErrorResponse
from service.uploads import check_count, decode_all, read_upload, request_body

router = APIRouter(tags=["encode"])


@router.post(
    "/encode",
    response_model=EncodeResponse,
    summary="Latent mean and standard deviation of images under a VAE's encoder",
    description=(
        "For VAEs: the encoder's q(z|x), a diagonal Gaussian, per image; the means make features for "
        "downstream models (docs/classify.md measures a linear probe on them). JSON with base64 `images`, "
        "or multipart/form-data with `files` and a `model` field."
    ),
    openapi_extra=request_body(EncodeRequest, {"resize": {"type": "boolean", "default": False}}),
    responses={
        **ERRORS,
        413: {"model": ErrorResponse, "description": "body or image too large"},
        415: {"model": ErrorResponse, "description": "neither JSON nor multipart"},
        422: {"model": ErrorResponse, "description": "not a VAE, bad image, wrong size, too many images"},
    },
)
async def encode(
    request: Request,
    registry: Registry,
    settings: AppSettings,
    metrics: AppMetrics,
    resize: bool | None = Query(None, description="convert mode and size instead of refusing"),
) -> EncodeResponse:
    parsed, data = await read_upload(request, EncodeRequest, EncodeForm)
    entry = registry.get(parsed.model)
    if entry.skeleton.kind != "vae":
        vaes = sorted(e.name for e in registry.entries.values() if e.skeleton.kind == "vae")
        raise BadRequest(
            f"model '{entry.name}' is {entry.skeleton.kind}, with no encoder; /encode needs a VAE "
            f"(`kind: vae` in GET /models: {vaes or 'none served'})"
        )
    request.state.model = entry.name
    request.state.images = len(data)
    check_count(len(data), settings.max_images)
    x, converted = await run_in_threadpool(
        decode_all, data, entry, resize=bool(resize or parsed.resize), max_pixels=settings.max_image_pixels
    )
    b = x.shape[0]
    out = await unless_disconnected(request, registry.encode(entry, torch.from_numpy(x)))
    assert out["mean"].shape[0] == b and out["std"].shape[0] == b, "one code per image"
    metrics.images_encoded.labels(model=entry.name).inc(b)
    results = [
        EncodeResult(index=i, mean=out["mean"][i].tolist(), std=out["std"][i].tolist(), resized=changed)
        for i, changed in enumerate(converted)
    ]
    return EncodeResponse(model=entry.name, latent_dim=int(out["mean"].shape[1]), results=results)
