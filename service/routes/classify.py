"""POST /classify: Bayes'-rule classification with refusal, for class-conditional models.

Per image the model gives log p(x|y) for every class (one pass per class); Bayes' rule with the
training prior gives p(y|x) and p(x) = sum_y p(x|y) p(y) (models/scoring/classify.py). An image whose p(x)
fails the calibrated outlier test (the model's default score above its threshold, a colour file
for a model of grayscale images, an image far dimmer than any training image: the peak check, or one
whose object spans far less of the frame: the extent check) is rejected: no class is forced on it.
"""

from __future__ import annotations

import math

import torch
from fastapi import APIRouter

from models.likelihood import bits_per_dim
from models.scoring.calibration import calibration_for
from service.deps import Registry
from service.entries import ModelEntry
from service.errors import BadRequest
from service.offload import INLINE_RESULTS, run_off_loop
from service.schemas import FORM_BOOL_SCHEMA, ClassifyRequest, ClassifyResponse, ClassifyResult, ImagesForm
from service.uploads import Decoded, Upload, crossed_checks, image_checks, request_body, upload_responses

router = APIRouter(tags=["classify"])


def require_conditional(registry: Registry, entry: ModelEntry) -> None:
    if entry.n_classes is None:
        conditional = sorted(e.name for e in registry.entries.values() if e.n_classes is not None)
        raise BadRequest(
            f"model '{entry.name}' is not class-conditional, so it has no p(x|y) to classify with; "
            f"use a model with `conditional: true` in GET /models ({conditional or 'none served'})"
        )


def build_results(
    entry: ModelEntry, score_type: str, out: dict[str, torch.Tensor], decoded: Decoded
) -> list[ClassifyResult]:
    classes = entry.classes or [str(i) for i in range(entry.n_classes or 0)]
    calibration = calibration_for(entry.meta, score_type)
    log_px = out["log_prob"].double()
    bpd = torch.as_tensor(bits_per_dim(log_px, entry.dims))
    posterior = out["class_log_posterior"].double().exp()
    results = []
    for i, changed in enumerate(decoded.converted):
        p = posterior[i]
        best = int(p.argmax())
        score = float(out["score"][i])
        found = image_checks(entry, decoded, i)
        rejected = calibration.is_outlier(score)
        if rejected is not None and crossed_checks(found):  # not a training image
            rejected = True
        results.append(
            ClassifyResult(
                index=i,
                predicted=None if rejected else classes[best],
                predicted_index=None if rejected else best,
                probability=float(p[best]),
                posterior={c: float(v) for c, v in zip(classes, p.tolist(), strict=True)},
                log_likelihood_nats=float(log_px[i]),
                bits_per_dim=float(bpd[i]),
                class_log_likelihood_nats={
                    c: float(v) for c, v in zip(classes, out["class_log_likelihood"][i].tolist(), strict=True)
                },
                score=score,
                threshold=calibration.threshold,
                percentile=calibration.percentile(score),
                rejected=rejected,
                resized=changed,
                **found,
            )
        )
    return results


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    summary="Classify images by Bayes' rule; refuse those unlike the training data",
    description=(
        "For class-conditional models: p(y|x) = p(x|y) p(y) / p(x) for every class, and `rejected: true` "
        "where p(x) = sum_y p(x|y) p(y) fails the calibrated outlier test. JSON with base64 `images`, or "
        "multipart/form-data with `files` and a `model` field. Costs one model pass per class."
    ),
    openapi_extra=request_body(ClassifyRequest, {"resize": FORM_BOOL_SCHEMA}),
    responses=upload_responses("not a conditional model, bad image, wrong size, too many"),
)
async def classify(upload: Upload) -> ClassifyResponse:
    registry, metrics = upload.registry, upload.metrics
    parsed, data, entry = await upload.receive(ClassifyRequest, ImagesForm)
    require_conditional(registry, entry)
    score_type = entry.default_score_type
    decoded = await upload.decode(data, entry, parsed)
    b = decoded.x.shape[0]
    work = registry.score(entry, torch.from_numpy(decoded.x), None, score_type=score_type, heatmap=False)
    out = await upload.wait(work)
    assert all(v.shape[0] == b for v in out.values()), "one output per image"
    results = await run_off_loop(b <= INLINE_RESULTS, build_results, entry, score_type, out, decoded)
    metrics.images_classified.labels(model=entry.name).inc(b)
    refused = sum(1 for r in results if r.rejected)
    if refused:
        metrics.classify_refused.labels(model=entry.name).inc(refused)
    prior = entry.prior
    assert math.isclose(sum(prior), 1.0, abs_tol=1e-4)
    return ClassifyResponse(
        model=entry.name,
        classes=entry.classes or [str(i) for i in range(len(prior))],
        prior=prior,
        score_type=score_type,
        results=results,
    )
