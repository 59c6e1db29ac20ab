"""Image uploads shared by /score, /classify and /encode: JSON with base64 ``images`` or
multipart/form-data with one or more ``files``, decoded and checked against the model's input."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import numpy as np
from fastapi import Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from models.scoring.extent import extents
from models.scoring.peak import peak_levels
from service import images
from service.disconnect import unless_disconnected
from service.entries import ModelEntry
from service.errors import BadRequest, UnsupportedMediaType
from service.metrics import Metrics
from service.offload import INLINE_DECODE_BYTES, run_off_loop
from service.registry import ModelRegistry
from service.schemas import MODEL_ERRORS, ColourResult, ErrorResponse, ExtentResult, Fit, PeakResult
from service.settings import Settings

J = TypeVar("J", bound=BaseModel)
F = TypeVar("F", bound=BaseModel)


def validation_error(e: ValidationError, where: str) -> RequestValidationError:
    return RequestValidationError([{**err, "loc": (where, *err["loc"])} for err in e.errors(include_url=False)])


def multipart_schema(fields: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI schema of a multipart variant: ``model``, ``files`` and the given extra fields."""
    return {
        "type": "object",
        "required": ["model", "files"],
        "properties": {
            "model": {"type": "string"},
            "files": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"}},
            **fields,
        },
    }


def upload_responses(bad_request: str) -> dict[int | str, dict[str, Any]]:
    """The error responses of an upload route, for its OpenAPI entry; ``bad_request`` describes its 422s."""
    return {
        **MODEL_ERRORS,
        413: {"model": ErrorResponse, "description": "body or image too large"},
        415: {"model": ErrorResponse, "description": "neither JSON nor multipart"},
        422: {"model": ErrorResponse, "description": bad_request},
    }


def request_body(json_model: type[BaseModel], form_fields: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` for a route that takes both content types."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": json_model.model_json_schema()},
                "multipart/form-data": {"schema": multipart_schema(form_fields)},
            },
        }
    }


async def read_upload(request: Request, json_model: type[J], form_model: type[F]) -> tuple[J | F, list[bytes | str]]:
    """The request's options (validated by ``json_model`` or ``form_model``) and its images: raw bytes
    (multipart) or base64 text (JSON, from the body's ``images``)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        try:
            body = json_model.model_validate_json(await request.body())
        except ValidationError as e:
            raise validation_error(e, "body") from e
        return body, list(body.images)  # type: ignore[attr-defined]
    if content_type == "multipart/form-data":
        async with request.form() as form:
            files = form.getlist("files")
            items = [(k, v) for k, v in form.multi_items() if k != "files"]
            fields = dict(items)
            if len(fields) < len(items):
                twice = sorted(k for k, count in Counter(k for k, _ in items).items() if count > 1)
                raise BadRequest(f"form field(s) {twice} sent more than once; send each option once")
            if any(not isinstance(v, str) for v in fields.values()):
                raise BadRequest("send images in the form field 'files'; other fields hold plain values")
            try:
                parsed = form_model.model_validate(fields)
            except ValidationError as e:
                raise validation_error(e, "body") from e
            if not files:
                raise BadRequest("send one or more images in the form field 'files'")
            data: list[bytes | str] = []
            for i, f in enumerate(files):
                if not isinstance(f, UploadFile):
                    raise BadRequest(f"files[{i}] is a text field; upload image files under 'files'")
                data.append(await f.read())
        return parsed, data
    raise UnsupportedMediaType(
        f"content type '{content_type or 'none'}' is not accepted; send application/json or multipart/form-data"
    )


def check_count(n: int, max_images: int) -> None:
    if n > max_images:
        raise BadRequest(
            f"{n} images is over the limit of {max_images} per request (GENSERVE_MAX_IMAGES); "
            "split them over several requests"
        )


@dataclass(frozen=True)
class Decoded:
    """A request's images as the model takes them, and what the conversion saw."""

    x: np.ndarray  # (B, C, H, W) model levels
    converted: list[bool]  # per image: converted to the model's mode or size (resize=true)
    colour: list[float | None]  # per image: the file's colour fraction, where the model checks colour
    peak: list[int]  # per image: its brightest sub-pixel as the model sees it, 8-bit levels (the peak check)
    extent: list[int]  # per image: pixels its object spans as the model sees it (extent check; 0 without one)


def peak_result(entry: ModelEntry, level: int) -> PeakResult | None:
    """The peak check of one image (None where the model's calibration has none)."""
    check = entry.peak_check
    return None if check is None else PeakResult.model_validate(check.result(level))


def extent_result(entry: ModelEntry, pixels: int) -> ExtentResult | None:
    """The extent check of one image (None where the model's calibration has none)."""
    check = entry.extent_check
    return None if check is None else ExtentResult.model_validate(check.result(pixels))


def image_checks(entry: ModelEntry, decoded: Decoded, i: int) -> dict[str, Any]:
    """Image i's checks that refuse it whatever its score, by field name: ``colour`` (of a converted file),
    ``peak`` and ``extent``; each None where the model has no such check."""
    return {
        "colour": colour_result(entry, decoded.colour[i]),
        "peak": peak_result(entry, decoded.peak[i]),
        "extent": extent_result(entry, decoded.extent[i]),
    }


def crossed_checks(checks: dict[str, Any]) -> list[str]:
    """The names of the checks of :func:`image_checks` that the image failed, in their order."""
    return [name for name, c in checks.items() if c is not None and c.crossed]


def colour_result(entry: ModelEntry, fraction: float | None) -> ColourResult | None:
    """The colour check of one file (None where the model has none or the image was not a converted file)."""
    check = entry.colour_check
    return None if check is None or fraction is None else ColourResult.model_validate(check.result(fraction))


def decode_all(
    data: list[bytes | str],
    entry: ModelEntry,
    *,
    resize: bool,
    max_pixels: int,
    colour: bool = True,
    fit: str = "pad",
) -> Decoded:
    """Every image as model levels (with ``resize`` sized by ``fit``), and with ``resize`` and ``colour``
    for a model with a colour check (one input channel) each file's colour fraction
    (models/image_convert.py ``colour_fraction``)."""
    arrays, converted, fractions = [], [], []
    check = entry.colour_check if resize and colour else None  # without resize a colour file is refused anyway
    for i, item in enumerate(data):
        raw = images.decode_base64(item, i) if isinstance(item, str) else item
        if not raw:
            raise BadRequest(f"image {i} is empty")
        im = images.open_image(raw, i, max_pixels=max_pixels, reduce=resize)
        fraction = None
        if check is None:
            arr, changed = images.fit_to_model(im, i, shape=entry.shape, model_name=entry.name, resize=resize, fit=fit)
        else:
            arr, changed, fraction = images.fit_with_colour(
                im, i, shape=entry.shape, model_name=entry.name, tolerance=check.tolerance, fit=fit
            )
        arrays.append(arr)
        converted.append(changed)
        fractions.append(fraction)
    x = images.to_levels(np.stack(arrays), entry.levels)
    span = entry.extent_check
    spans = [0] * len(x) if span is None else extents(x, entry.levels, span.level).tolist()  # as calibrate measures
    return Decoded(x, converted, fractions, peak_levels(x, entry.levels).tolist(), spans)


async def receive(
    request: Request, registry: ModelRegistry, settings: Settings, json_model: type[J], form_model: type[F]
) -> tuple[J | F, list[bytes | str], ModelEntry]:
    """A route's upload: its options, its images (not yet decoded) and the model it names (404 if
    unknown; 422 over GENSERVE_MAX_IMAGES). Routes check the model fits before :func:`decode`."""
    parsed, data = await read_upload(request, json_model, form_model)
    entry = registry.get(parsed.model)  # type: ignore[union-attr]  # every request schema has `model`
    request.state.model = entry.name
    request.state.images = len(data)
    check_count(len(data), settings.max_images)
    return parsed, data, entry


async def decode(
    data: list[bytes | str],
    entry: ModelEntry,
    settings: Settings,
    *,
    resize: bool,
    colour: bool = True,
    slots: asyncio.Semaphore | None = None,
    fit: str = "pad",
) -> Decoded:
    """:func:`decode_all`, in the thread pool unless the upload is small and needs no conversion. (A
    few KiB of PNG can hold millions of flat pixels: converting them is work for the pool; without
    ``resize`` an image of the wrong size is refused from its header, before its pixels are decoded.)
    Work for the pool waits for one of ``slots`` (``GENSERVE_MAX_CONCURRENT_DECODES``), which bounds
    the memory that decoding takes at once."""
    small = not resize and sum(len(d) for d in data) <= INLINE_DECODE_BYTES
    kwargs: dict[str, Any] = {"resize": resize, "max_pixels": settings.max_image_pixels, "colour": colour, "fit": fit}
    if small:
        return decode_all(data, entry, **kwargs)
    async with slots if slots is not None else contextlib.nullcontext():
        return await run_off_loop(False, decode_all, data, entry, **kwargs)


R = TypeVar("R")


@dataclass(frozen=True)
class UploadCall:
    """What an upload route (/score, /classify, /encode) works with: its request, the app's registry,
    settings and metrics, and the ``resize`` and ``fit`` query parameters; :meth:`receive`, :meth:`decode`
    and :meth:`wait` are its steps."""

    request: Request
    registry: ModelRegistry
    settings: Settings
    metrics: Metrics
    resize: bool | None
    fit: Fit | None = None

    async def receive(self, json_model: type[J], form_model: type[F]) -> tuple[J | F, list[bytes | str], ModelEntry]:
        return await receive(self.request, self.registry, self.settings, json_model, form_model)

    async def decode(self, data: list[bytes | str], entry: ModelEntry, parsed: Any, *, colour: bool = True) -> Decoded:
        """The images as levels (B, C, H, W), converted where ``resize`` is set in the query or the body
        and sized by ``fit`` (the query's, else the body's); ``colour``: measure each file's colour for
        the model's colour check."""
        resize = bool(self.resize or parsed.resize)
        fit = self.fit or parsed.fit
        slots = self.request.app.state.decode_slots
        return await decode(data, entry, self.settings, resize=resize, colour=colour, slots=slots, fit=fit)

    async def wait(self, work: Awaitable[R]) -> R:
        """The model's answer, unless the client goes away first (service/disconnect.py)."""
        return await unless_disconnected(self.request, work)


async def upload_call(
    request: Request,
    resize: bool | None = Query(None, description="convert mode and size instead of refusing"),
    fit: Fit | None = Query(None, description="with resize: pad (keep the aspect ratio) or stretch; default pad"),
) -> UploadCall:
    # The app's parts straight from its state, not as three more dependencies: FastAPI's solving of
    # each costs the event loop more than the rest of a small request (bench/request_overhead.py).
    state = request.app.state
    return UploadCall(
        request=request,
        registry=state.registry,
        settings=state.settings,
        metrics=state.metrics,
        resize=resize,
        fit=fit,
    )


Upload = Annotated[UploadCall, Depends(upload_call)]
