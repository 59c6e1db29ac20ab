"""What /sample and /sample/stream share: the request's checks (one dependency) and the answer.

:func:`checked_sample` resolves a :class:`~service.schemas.SampleRequest` against the served
model (404 for an unknown one, 422 over GENSERVE_MAX_SAMPLES or for a label that does not fit)
and draws a seed where the request has none; :func:`sample_response` turns the drawn images into
the JSON answer both routes give.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated

import numpy as np
from fastapi import Depends, Request

from models.likelihood import bits_per_dim
from service import images
from service.deps import AppSettings, Registry
from service.entries import ModelEntry
from service.errors import BadRequest
from service.jobs import SampleResult
from service.schemas import SampleRequest, SampleResponse


@dataclass(frozen=True)
class SampleCall:
    """A checked sampling request: the model's entry, n, the seed used, temperature and class index."""

    entry: ModelEntry
    n: int
    seed: int
    temperature: float
    label: int | None


async def checked_sample(
    body: SampleRequest, request: Request, registry: Registry, settings: AppSettings
) -> SampleCall:
    entry = registry.get(body.model)
    request.state.model = entry.name
    request.state.images = body.n
    if body.n > settings.max_samples:
        raise BadRequest(
            f"n={body.n} is over the limit of {settings.max_samples} samples per request (GENSERVE_MAX_SAMPLES)"
        )
    label = entry.label_index(body.label)
    seed = body.seed if body.seed is not None else secrets.randbelow(2**53)  # exact in JSON doubles too
    return SampleCall(entry=entry, n=body.n, seed=seed, temperature=body.temperature or 1.0, label=label)


CheckedSample = Annotated[SampleCall, Depends(checked_sample)]


def pngs(pixels: np.ndarray) -> list[str]:
    """Base64 PNGs of images (n, C, H, W) uint8."""
    return [images.b64(images.encode_png(p)) for p in pixels]


def sample_response(call: SampleCall, result: SampleResult) -> SampleResponse:
    """The JSON answer for drawn images (PNG encoding: run it in the thread pool)."""
    entry = call.entry
    pixels = images.from_levels(result.images.numpy(), entry.levels)  # (n, C, H, W) uint8
    log_prob = None if result.log_prob is None else result.log_prob.double()
    return SampleResponse(
        model=entry.name,
        seed=call.seed,
        label=call.label,
        images=pngs(pixels),
        bits_per_dim=None if log_prob is None else _floats(bits_per_dim(log_prob, entry.dims)),
        log_likelihood_nats=None if log_prob is None else _floats(log_prob),
    )


def _floats(t: object) -> list[float]:
    return [float(v) for v in np.asarray(t).reshape(-1)]
