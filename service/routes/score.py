"""POST /score: likelihood and outlier score of uploaded images (JSON base64 or multipart files).

In steps: parse the request → decode and check every image (thread pool) → score them in the
model's batcher → encode the answer (heatmap PNGs in the thread pool).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from models.likelihood import bits_per_dim
from service import images, scoring
from service.deps import AppMetrics, AppSettings, Registry
from service.disconnect import unless_disconnected
from service.errors import BadRequest, UnsupportedMediaType
from service.registry import ModelEntry
from service.routes.sample import ERRORS
from service.schemas import ErrorResponse, ScoreForm, ScoreRequest, ScoreResponse, ScoreResult

router = APIRouter(tags=["score"])

MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["model", "files"],
    "properties": {
        "model": {"type": "string"},
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "score_type": {"type": "string"},
        "heatmap": {"type": "boolean", "default": False},
        "resize": {"type": "boolean", "default": False},
        "label": {"type": "string"},
    },
}
REQUEST_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": ScoreRequest.model_json_schema()},
        "multipart/form-data": {"schema": MULTIPART_SCHEMA},
    },
}


@dataclass
class ScoreInput:
    """A /score request, whichever content type it came in."""

    model: str
    data: list[bytes | str]  # raw bytes (multipart) or base64 text (JSON)
    score_type: str | None
    heatmap: bool
    resize: bool
    label: int | str | None


def _validation_error(e: ValidationError, where: str) -> RequestValidationError:
    return RequestValidationError([{**err, "loc": (where, *err["loc"])} for err in e.errors(include_url=False)])


async def parse_request(request: Request, resize_query: bool | None) -> ScoreInput:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        try:
            body = ScoreRequest.model_validate_json(await request.body())
        except ValidationError as e:
            raise _validation_error(e, "body") from e
        return ScoreInput(
            body.model, list(body.images), body.score_type, body.heatmap, resize_query or body.resize, body.label
        )
    if content_type == "multipart/form-data":
        async with request.form() as form:
            files = form.getlist("files")
            fields = {k: v for k, v in form.multi_items() if k != "files"}
            if any(not isinstance(v, str) for v in fields.values()):
                raise BadRequest("send images in the form field 'files'; other fields hold plain values")
            try:
                parsed = ScoreForm.model_validate(fields)
            except ValidationError as e:
                raise _validation_error(e, "body") from e
            if not files:
                raise BadRequest("send one or more images in the form field 'files'")
            data: list[bytes | str] = []
            for i, f in enumerate(files):
                if not isinstance(f, UploadFile):
                    raise BadRequest(f"files[{i}] is a text field; upload image files under 'files'")
                data.append(await f.read())
        return ScoreInput(
            parsed.model, data, parsed.score_type, parsed.heatmap, resize_query or parsed.resize, parsed.label
        )
    raise UnsupportedMediaType(
        f"content type '{content_type or 'none'}' is not accepted; send application/json or multipart/form-data"
    )


def decode_all(inp: ScoreInput, entry: ModelEntry, max_pixels: int) -> tuple[np.ndarray, list[bool]]:
    """Every image as model levels (B, C, H, W) uint8, and whether each was converted."""
    arrays, converted = [], []
    for i, item in enumerate(inp.data):
        raw = images.decode_base64(item, i) if isinstance(item, str) else item
        if not raw:
            raise BadRequest(f"image {i} is empty")
        im = images.open_image(raw, i, max_pixels=max_pixels)
        arr, changed = images.fit_to_model(im, i, shape=entry.shape, model_name=entry.name, resize=inp.resize)
        arrays.append(arr)
        converted.append(changed)
    return images.to_levels(np.stack(arrays), entry.levels), converted


def build_results(
    entry: ModelEntry, score_type: str, out: dict[str, torch.Tensor], converted: list[bool]
) -> list[ScoreResult]:
    calibration = scoring.calibration_for(entry.meta, score_type)
    scale = scoring.heatmap_scale_nats(entry.skeleton) if "heatmap" in out else None
    log_prob = out["log_prob"].double()
    bpd = torch.as_tensor(bits_per_dim(log_prob, entry.dims))
    results = []
    for i, changed in enumerate(converted):
        score = float(out["score"][i])
        heatmap = None
        if scale is not None:
            heatmap = images.b64(images.heatmap_png(out["heatmap"][i].numpy(), scale_nats=scale))
        results.append(
            ScoreResult(
                index=i,
                log_likelihood_nats=float(log_prob[i]),
                bits_per_dim=float(bpd[i]),
                score=score,
                threshold=calibration.threshold,
                is_outlier=calibration.is_outlier(score),
                percentile=calibration.percentile(score),
                resized=changed,
                heatmap=heatmap,
                heatmap_scale_nats=scale,
            )
        )
    return results


@router.post(
    "/score",
    response_model=ScoreResponse,
    summary="Score images: likelihood, outlier score, optional heatmap",
    description=(
        "JSON with base64 `images`, or multipart/form-data with one or more `files` and a `model` field "
        "(`?resize=true` works for both). Results come back in input order."
    ),
    openapi_extra={"requestBody": REQUEST_BODY},
    responses={
        **ERRORS,
        413: {"model": ErrorResponse, "description": "body or image too large"},
        415: {"model": ErrorResponse, "description": "neither JSON nor multipart"},
        422: {"model": ErrorResponse, "description": "bad image, wrong size, too many images, bad option"},
    },
)
async def score(
    request: Request,
    registry: Registry,
    settings: AppSettings,
    metrics: AppMetrics,
    resize: bool | None = Query(None, description="convert mode and size instead of refusing"),
) -> ScoreResponse:
    inp = await parse_request(request, resize)
    entry = registry.get(inp.model)
    request.state.model = entry.name
    request.state.images = len(inp.data)
    if len(inp.data) > settings.max_images:
        raise BadRequest(
            f"{len(inp.data)} images is over the limit of {settings.max_images} per request (GENSERVE_MAX_IMAGES); "
            "split them over several requests"
        )
    score_type = entry.resolve_score_type(inp.score_type)
    if inp.heatmap and not entry.per_pixel:
        raise BadRequest(
            f"heatmaps need per-pixel likelihoods, which only autoregressive models give; "
            f"model '{entry.name}' is a {entry.skeleton.kind}"
        )
    label = entry.label_index(inp.label)
    x, converted = await run_in_threadpool(decode_all, inp, entry, settings.max_image_pixels)
    b = x.shape[0]
    y = None if label is None else torch.full((b,), label, dtype=torch.long)
    work = registry.score(entry, torch.from_numpy(x), y, score_type=score_type, heatmap=inp.heatmap)
    out = await unless_disconnected(request, work)
    assert all(v.shape[0] == b for v in out.values()), "one output per image"
    results = await run_in_threadpool(build_results, entry, score_type, out, converted)
    metrics.images_scored.labels(model=entry.name, score_type=score_type).inc(b)
    flagged = sum(1 for r in results if r.is_outlier)
    if flagged:
        metrics.outliers.labels(model=entry.name, score_type=score_type).inc(flagged)
    return ScoreResponse(model=entry.name, score_type=score_type, results=results)
