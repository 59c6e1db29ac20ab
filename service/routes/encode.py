"""POST /encode: a VAE's latent code q(z|x) = N(mean, diag(std^2)) per image, as features."""

from __future__ import annotations

import torch
from fastapi import APIRouter

from service.errors import BadRequest
from service.schemas import FORM_BOOL_SCHEMA, EncodeRequest, EncodeResponse, EncodeResult, ImagesForm
from service.uploads import Upload, request_body, upload_responses

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
    openapi_extra=request_body(EncodeRequest, {"resize": FORM_BOOL_SCHEMA}),
    responses=upload_responses("not a VAE, bad image, wrong size, too many images"),
)
async def encode(upload: Upload) -> EncodeResponse:
    registry, metrics = upload.registry, upload.metrics
    parsed, data, entry = await upload.receive(EncodeRequest, ImagesForm)
    if entry.skeleton.kind != "vae":
        vaes = sorted(e.name for e in registry.entries.values() if e.skeleton.kind == "vae")
        raise BadRequest(
            f"model '{entry.name}' is {entry.skeleton.kind}, with no encoder; /encode needs a VAE "
            f"(`kind: vae` in GET /models: {vaes or 'none served'})"
        )
    decoded = await upload.decode(data, entry, parsed, colour=False)  # a code has no outlier verdict
    x, converted = decoded.x, decoded.converted
    b = x.shape[0]
    out = await upload.wait(registry.encode(entry, torch.from_numpy(x)))
    assert out["mean"].shape[0] == b and out["std"].shape[0] == b, "one code per image"
    metrics.images_encoded.labels(model=entry.name).inc(b)
    results = [
        EncodeResult(index=i, mean=out["mean"][i].tolist(), std=out["std"][i].tolist(), resized=changed)
        for i, changed in enumerate(converted)
    ]
    return EncodeResponse(model=entry.name, latent_dim=int(out["mean"].shape[1]), results=results)
