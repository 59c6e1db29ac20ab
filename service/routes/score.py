"""POST /score: likelihood and outlier score of uploaded images (JSON base64 or multipart files).

In steps: parse the request → decode and check every image (thread pool) → score them in the
model's batcher → encode the answer (heatmap PNGs in the thread pool). A class-conditional model
scores p(x) = sum_y p(x|y) p(y) (calibrated) unless the request names a label (then p(x|y), with no
threshold: the calibration is of p(x)).
"""

from __future__ import annotations

import numpy as np
import torch
from fastapi import APIRouter

from models.likelihood import bits_per_dim
from models.scoring.calibration import Calibration, calibration_for
from service import images, scoring
from service.entries import ModelEntry
from service.errors import BadRequest
from service.offload import INLINE_RESULTS, run_off_loop
from service.schemas import (
    FORM_BOOL_SCHEMA,
    ScoreExplanation,
    ScoreForm,
    ScoreRequest,
    ScoreResponse,
    ScoreResult,
)
from service.uploads import Decoded, Upload, crossed_checks, image_checks, request_body, upload_responses

router = APIRouter(tags=["score"])

FORM_FIELDS = {
    "score_type": {"type": "string"},
    "heatmap": FORM_BOOL_SCHEMA,
    "input_image": FORM_BOOL_SCHEMA,
    "resize": FORM_BOOL_SCHEMA,
    "label": {"type": "string"},
}


def build_results(
    entry: ModelEntry,
    score_type: str,
    out: dict[str, torch.Tensor],
    decoded: Decoded,
    *,
    labelled: bool = False,
    inputs: np.ndarray | None = None,
) -> list[ScoreResult]:
    """One result per image; ``inputs`` (B, C, H, W) levels, when given, come back as PNGs (``input_image``).
    A file that fails the model's colour check (models/scoring/colour.py), or an image its peak check
    (models/scoring/peak.py) or its extent check (models/scoring/extent.py), is an outlier whatever its score."""
    # A conditional model's calibration is of p(x); scores of p(x|y) for a given label have none.
    calibrated = not (labelled and entry.n_classes is not None)
    calibration = calibration_for(entry.meta, score_type) if calibrated else Calibration()
    scale = scoring.heatmap_scale_nats(entry.skeleton) if "heatmap" in out else None
    # Python floats, once: a torch op per value costs more than the rest of a small answer.
    log_prob: list[float] = out["log_prob"].tolist()  # float32 to Python floats: exact
    scores: list[float] = out["score"].tolist()
    results = []
    for i, changed in enumerate(decoded.converted):
        score = float(scores[i])
        found = image_checks(entry, decoded, i)
        checks = crossed_checks(found)
        outlier = calibration.is_outlier(score)
        if outlier is not None and checks:
            outlier = True
        heatmap = None
        if scale is not None:
            heatmap = images.b64(images.heatmap_png(out["heatmap"][i].numpy(), scale_nats=scale))
        results.append(
            ScoreResult(
                index=i,
                log_likelihood_nats=log_prob[i],
                bits_per_dim=float(bits_per_dim(log_prob[i], entry.dims)),
                score=score,
                threshold=calibration.threshold,
                is_outlier=outlier,
                percentile=calibration.percentile(score),
                resized=changed,
                heatmap=heatmap,
                heatmap_scale_nats=scale,
                input_image=None if inputs is None else images.b64(images.encode_png(inputs[i])),
                explanation=explanation(entry, out, i, calibration.threshold, checks) if calibrated else None,
                **found,
            )
        )
    return results


def explanation(
    entry: ModelEntry, out: dict[str, torch.Tensor], i: int, threshold: float | None, checks: list[str]
) -> ScoreExplanation | None:
    """The dose explanation of image i; ``checks``: the checks it failed ("colour", "peak", "extent"), which
    decided first, whatever the statistics say."""
    fit = entry.dose_fit
    got = None if fit is None else scoring.explanation(fit, out, i, threshold)
    if got is None:
        return None
    got["decided_by"] = [*checks, *got["decided_by"]]
    return ScoreExplanation.model_validate(got)


@router.post(
    "/score",
    response_model=ScoreResponse,
    summary="Score images: likelihood, outlier score, optional heatmap",
    description=(
        "JSON with base64 `images`, or multipart/form-data with one or more `files` and a `model` field "
        "(`?resize=true` works for both). Results come back in input order."
    ),
    openapi_extra=request_body(ScoreRequest, FORM_FIELDS),
    responses=upload_responses("bad image, wrong size, too many images, bad option"),
)
async def score(upload: Upload) -> ScoreResponse:
    request, registry, metrics = upload.request, upload.registry, upload.metrics
    parsed, data, entry = await upload.receive(ScoreRequest, ScoreForm)
    score_type = entry.resolve_score_type(parsed.score_type, labelled=parsed.label is not None)
    if parsed.heatmap and not entry.per_pixel:
        raise BadRequest(
            f"heatmaps need per-pixel likelihoods, which only autoregressive models give; "
            f"model '{entry.name}' is a {entry.skeleton.kind}"
        )
    label = entry.label_index(parsed.label, required=False)
    if parsed.heatmap and entry.n_classes is not None and label is None:
        raise BadRequest(
            f"model '{entry.name}' is class-conditional: without a label it scores p(x) = sum_y p(x|y) p(y), "
            "which has no per-pixel terms; send 'label' for a heatmap of p(x|y)"
        )
    decoded = await upload.decode(data, entry, parsed)
    x = decoded.x
    b = x.shape[0]
    y = None if label is None else torch.full((b,), label, dtype=torch.long)
    work = registry.score(entry, torch.from_numpy(x), y, score_type=score_type, heatmap=parsed.heatmap)
    out = await upload.wait(work)
    assert all(v.shape[0] == b for v in out.values()), "one output per image"
    inputs = images.from_levels(x, entry.levels) if parsed.input_image else None
    small = b <= INLINE_RESULTS and inputs is None and not parsed.heatmap
    results = await run_off_loop(
        small, build_results, entry, score_type, out, decoded, labelled=label is not None, inputs=inputs
    )
    metrics.images_scored.labels(model=entry.name, score_type=score_type).inc(b)
    request.app.state.drift.observe(entry, score_type, [(r.score, r.is_outlier) for r in results])  # docs/drift.md
    flagged = sum(1 for r in results if r.is_outlier)
    if flagged:
        metrics.outliers.labels(model=entry.name, score_type=score_type).inc(flagged)
    return ScoreResponse(model=entry.name, score_type=score_type, results=results)
