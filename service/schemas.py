"""Request and response bodies of every endpoint; these are what /docs shows."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, StrictStr

from models.base import MAX_TEMPERATURE, MIN_TEMPERATURE

Label = StrictInt | StrictStr

FORM_BOOLS = {"true": True, "false": False, "1": True, "0": False}


def form_bool(value: Any) -> Any:
    """A multipart field's text as a bool: exactly one of FORM_BOOLS' spellings."""
    if isinstance(value, str):
        if value not in FORM_BOOLS:
            raise ValueError(f"send one of {list(FORM_BOOLS)}")
        return FORM_BOOLS[value]
    return value


FormBool = Annotated[bool, BeforeValidator(form_bool)]
Fit = Literal["pad", "stretch"]  # models/image_convert.py FITS: how resize=true sizes another aspect ratio
# The schema of such a field in the multipart variants' OpenAPI entries.
FORM_BOOL_SCHEMA: dict[str, Any] = {"type": "string", "enum": list(FORM_BOOLS), "default": "false"}


class FieldError(BaseModel):
    """One field that failed validation (FastAPI's format)."""

    loc: list[str | int] = Field(description='where: ["body", "n"], ["query", "resize"], ...')
    msg: str = Field(description="what is wrong with it")
    type: str = Field(description="pydantic's error type, e.g. less_than_equal, missing, finite_number")
    input: Any = Field(None, description="the value sent (text over 200 characters is cut)")
    ctx: dict[str, Any] | None = Field(None, description='the limit broken, e.g. {"le": 1000.0}')


class ErrorResponse(BaseModel):
    detail: str | list[FieldError] = Field(
        description="what went wrong and what to change; for a request that fails validation, one entry per field"
    )
    request_id: str | None = Field(None, description="set on 500s; quote it when reporting the problem")


# The errors every route that names a model may answer, for its OpenAPI entry.
MODEL_ERRORS: dict[int | str, dict[str, object]] = {
    404: {"model": ErrorResponse, "description": "unknown model"},
    503: {"model": ErrorResponse, "description": "the model's workers are busy or loading; see Retry-After"},
    504: {"model": ErrorResponse, "description": "not done within GENSERVE_REQUEST_TIMEOUT_S"},
}


class ModelInfo(BaseModel):
    name: str = Field(description="the checkpoint folder's name; pass it as `model`")
    kind: Literal["autoregressive", "vae"]
    architecture: str
    shape: list[int] = Field(description="[C, H, W] of the images the model takes and draws")
    levels: int = Field(description="values per sub-pixel (256 for 8-bit images)")
    dataset: str | None = Field(description="name of the training data set")
    classes: list[str] | None = Field(
        description="class names of the training data set, where it has them; `conditional` says whether the "
        "model takes them as labels"
    )
    metrics: dict[str, Any] = Field(description="test-set metrics recorded in the checkpoint")
    calibration: dict[str, Any] | None = Field(description="outlier calibration recorded by `genserve calibrate`")
    sha256: str = Field(description="sha256 of the weights file serving now (responses name it in X-Model-SHA256)")
    version: int = Field(description="how many times this process has loaded the model (1 at startup, +1 per reload)")
    loaded_at: float = Field(description="Unix time the serving version was loaded")
    last_reload_error: str | None = Field(
        description="why the last offered version was refused (the one above kept serving); null if none was"
    )
    devices: list[str] = Field(description="one worker per entry")
    pass_sizes: list[int] = Field(
        description="per worker (as `devices`), the most images one score pass holds: the size its warm-up "
        "timed fastest per image (GENSERVE_BATCH_SWEEP), else GENSERVE_MAX_BATCH_SIZE"
    )
    exact_likelihood: bool = Field(description="false where log p(x) is an estimate (a VAE's IWAE bound)")
    conditional: bool = Field(
        description="true for class-conditional models: /sample needs a `label`, /classify works, and /score "
        "scores p(x) = sum_y p(x|y) p(y) without a label or p(x|y) with one"
    )
    score_types: list[str] = Field(description="values accepted as `score_type` by /score")
    default_score_type: str = Field(description="the score /score uses unless a request names another")
    background: dict[str, Any] | None = Field(
        description="the background model behind `likelihood_ratio` (Ren et al. 2019), if the model has one"
    )
    companion: dict[str, Any] | None = Field(
        None,
        description="the companion model whose statistics the `dose` score combines (`companion_*` in an "
        "explanation), if the model has one",
    )


class ModelList(BaseModel):
    models: list[ModelInfo]


class ModelRequest(BaseModel):
    """The base of every JSON request body: strict types, no unknown fields, and the model to use."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), strict=True)

    model: str = Field(description="model name from GET /models")


class ModelForm(BaseModel):
    """The base of every multipart/form-data request's fields (text, so not strict): the model to use."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str


class SampleRequest(ModelRequest):
    n: int = Field(1, ge=1, description="images to draw (at most GENSERVE_MAX_SAMPLES)")
    seed: int | None = Field(
        None, ge=0, le=2**63 - 1, description="same seed (and model, n, temperature, label, device) -> same images"
    )
    temperature: float | None = Field(
        None,
        ge=MIN_TEMPERATURE,
        le=MAX_TEMPERATURE,
        allow_inf_nan=False,
        description="sharpness: < 1 more typical, > 1 more varied (a VAE scales its prior's std); default 1. "
        f"From {MIN_TEMPERATURE:g} to {MAX_TEMPERATURE:g} (for the shipped autoregressive models: every draw "
        "the most likely value, and nearly uniform noise)",
    )
    label: Label | None = Field(None, description="class name or index; required by class-conditional models only")


class SampleResponse(BaseModel):
    model: str
    seed: int = Field(description="the seed used (a random one when the request had none)")
    label: int | None = Field(description="the class index drawn from, for class-conditional models")
    images: list[str] = Field(description="base64 PNGs, one per sample")
    bits_per_dim: list[float] | None = Field(
        description="-log2 p(sample) / (C*H*W) where the model's likelihood is exact"
    )
    log_likelihood_nats: list[float] | None = Field(description="log p(sample) in nats where exact, else null")


class ImagesRequest(ModelRequest):
    """Images for a model, as base64 in JSON (/classify and /encode)."""

    images: list[str] = Field(min_length=1, description="base64-encoded image files (PNG, JPEG, ...)")
    resize: bool = Field(False, description="convert mode and size to the model's instead of refusing")
    fit: Fit = Field(
        "pad",
        description="with resize, how an image of another aspect ratio is sized: pad (keep the aspect ratio, "
        "centred on the median colour of its edges) or stretch",
    )


class ImagesForm(ModelForm):
    """The multipart/form-data variant of ImagesRequest: files in the `files` field."""

    resize: FormBool = False
    fit: Fit = "pad"


class ScoreRequest(ImagesRequest):
    score_type: str | None = Field(None, description="one of the model's score_types; default its default_score_type")
    heatmap: bool = Field(False, description="also return a per-pixel NLL map (autoregressive models only)")
    input_image: bool = Field(False, description="also return each image as the model saw it (after any conversion)")
    label: Label | None = Field(
        None,
        description="class-conditional models only: score p(x|y) for this class (name or index) instead of "
        "p(x) = sum_y p(x|y) p(y); the calibration is of p(x), so labelled scores carry no threshold",
    )


class ScoreForm(ImagesForm):
    """The multipart/form-data variant of ScoreRequest: files in the `files` field."""

    score_type: str | None = None
    heatmap: FormBool = False
    input_image: FormBool = False
    label: str | None = None


class StatisticExplanation(BaseModel):
    value: float = Field(description="the statistic's value for this image (units in the calibration's dose entry)")
    tail: str = Field(description="where an outlier lies: upper, lower or both")
    p_value: float = Field(description="probability of a value this far out among in-distribution images")
    contribution: float = Field(description="this statistic's share of the dose score (shares sum to the score)")
    crossed: bool = Field(description="one of the statistics that decided the refusal (see decided_by)")


class ScoreExplanation(BaseModel):
    statistics: dict[str, StatisticExplanation]
    decided_by: list[str] = Field(
        description="when refused: 'colour' first if the file failed the colour check, 'peak' if the image failed "
        "the peak check, 'extent' if it failed the extent check, then (if the score is over "
        "the threshold) the fewest statistics, largest share first, whose shares alone exceed it; empty when the "
        "image passed"
    )
    most_extreme: str = Field(description="the statistic with the smallest p_value")


class ColourResult(BaseModel):
    """The colour check of an uploaded file, for a model trained on grayscale images (calibration.colour)."""

    fraction: float = Field(
        description="fraction (0..1) of the file's pixels whose chroma max(R,G,B) - min(R,G,B) exceeds tolerance, "
        "measured after alpha is composited over white"
    )
    tolerance: int = Field(description="chroma, in 8-bit levels, up to which a pixel counts as gray")
    max_fraction: float = Field(description="the largest fraction of coloured pixels accepted")
    crossed: bool = Field(
        description="fraction > max_fraction: the file is in colour, unlike every training image, and is refused "
        "whatever its score (convert it to grayscale yourself to have it judged on its luma)"
    )


class PeakResult(BaseModel):
    """The peak check of an image (calibration.peak): its brightest pixel against the training data's."""

    level: int = Field(description="the image's brightest sub-pixel as the model sees it, 8-bit levels (0..255)")
    floor: int = Field(description="the lowest brightest-pixel accepted: min_level minus the check's tolerance")
    min_level: int = Field(description="the dimmest brightest-pixel among the calibration images")
    crossed: bool = Field(
        description="level < floor: the image is far dimmer than every training image and is refused whatever its "
        "score (stretch its contrast yourself to have it judged on its shapes)"
    )


class ExtentResult(BaseModel):
    """The extent check of an image (calibration.extent): how much of the frame its object spans, against the
    training data's."""

    pixels: int = Field(
        description="the larger side, in pixels of the model's input, of the bounding box of the image's pixels "
        "brighter than the check's level (the object's extent)"
    )
    floor: int = Field(description="the smallest extent accepted: min_extent minus the check's tolerance")
    min_extent: int = Field(description="the smallest extent among the calibration images")
    crossed: bool = Field(
        description="pixels < floor: the object spans far less of the frame than in every training image (a small "
        "mark on a clean ground) and the image is refused whatever its score (crop it to the object yourself to "
        "have it judged on its shapes)"
    )


class ScoreResult(BaseModel):
    index: int = Field(description="position of the image in the request")
    log_likelihood_nats: float = Field(
        description="log p(x) in nats (for a VAE the IWAE estimate behind the score, k in calibration)"
    )
    bits_per_dim: float = Field(description="-log2 p(x) / (C*H*W)")
    score: float = Field(description="the score_type's value; higher is more unusual")
    threshold: float | None = Field(description="calibrated outlier threshold for this score, if any")
    is_outlier: bool | None = Field(
        description="when calibrated: score > threshold, or the file failed the colour check (colour.crossed) or "
        "the image the peak check (peak.crossed) or the extent check (extent.crossed)"
    )
    percentile: float | None = Field(description="where the score falls among calibration quantiles (0..100)")
    resized: bool = Field(description="true if the image was converted to the model's mode or size")
    heatmap: str | None = Field(
        description="base64 grayscale PNG (H x W): per-pixel NLL summed over channels (for likelihood_ratio "
        "minus the background model's), linear from 0 nats or less (black) to heatmap_scale_nats or more (white)"
    )
    heatmap_scale_nats: float | None = Field(description="NLL drawn as white: C * ln(levels), a uniform guess")
    input_image: str | None = Field(
        None,
        description="with input_image=true: base64 PNG (C x H x W, 8-bit) of the array the model scored, after "
        "the conversion that resize=true applies (mode, size); what the web page shows",
    )
    explanation: ScoreExplanation | None = Field(
        None, description="score_type 'dose' only: which of the model's statistics made the decision, and how"
    )
    colour: ColourResult | None = Field(
        None,
        description="files converted with resize=true for a model of grayscale images: how much of the file is in "
        "colour (a colour file is refused); null where not checked",
    )
    peak: PeakResult | None = Field(
        None, description="the peak check (a far dimmer image than any training image is refused); null where none"
    )
    extent: ExtentResult | None = Field(
        None,
        description="the extent check (an object spanning far less of the frame than in any training image is "
        "refused); null where none",
    )


class ScoreResponse(BaseModel):
    model: str
    score_type: str
    results: list[ScoreResult]


class ClassifyRequest(ImagesRequest):
    model: str = Field(description="a class-conditional model from GET /models (`conditional: true`)")


class ClassifyResult(BaseModel):
    index: int = Field(description="position of the image in the request")
    predicted: str | None = Field(
        description="the most probable class under p(y|x); null when the image is rejected (a model without a "
        "calibration rejects nothing: `rejected` is null and the class is always given)"
    )
    predicted_index: int | None = Field(description="index of `predicted` in the model's classes")
    probability: float = Field(description="p(predicted | x), or of the argmax class when rejected")
    posterior: dict[str, float] = Field(description="p(y|x) for every class by Bayes' rule; sums to 1")
    log_likelihood_nats: float = Field(description="log p(x) = log sum_y p(x|y) p(y) in nats (exact)")
    bits_per_dim: float = Field(description="-log2 p(x) / (C*H*W)")
    class_log_likelihood_nats: dict[str, float] = Field(description="log p(x|y) in nats for every class")
    score: float = Field(description="the outlier score of p(x) (the model's default score type)")
    threshold: float | None = Field(description="the calibrated threshold; null if the model is not calibrated")
    percentile: float | None = Field(description="where the score falls among calibration quantiles (0..100)")
    rejected: bool | None = Field(
        description="true when p(x) fails the calibrated outlier test (score > threshold) or the file fails the "
        "colour check (colour.crossed), the peak check (peak.crossed) or the extent check (extent.crossed): the "
        "image does not look like the training "
        "data, so no class is given; "
        "null if the model is not calibrated"
    )
    resized: bool = Field(description="true if the image was converted to the model's mode or size")
    colour: ColourResult | None = Field(
        None, description="the colour check of a file converted with resize=true (see /score); null where not checked"
    )
    peak: PeakResult | None = Field(None, description="the peak check (see /score); null where the model has none")
    extent: ExtentResult | None = Field(
        None, description="the extent check (see /score); null where the model has none"
    )


class ClassifyResponse(BaseModel):
    model: str
    classes: list[str]
    prior: list[float] = Field(description="p(y), the training class frequencies, in class order")
    score_type: str = Field(description="the outlier score behind `rejected`")
    results: list[ClassifyResult]


class EncodeRequest(ImagesRequest):
    model: str = Field(description="a VAE from GET /models (`kind: vae`)")


class EncodeResult(BaseModel):
    index: int = Field(description="position of the image in the request")
    mean: list[float] = Field(description="mean of q(z|x), latent_dim values")
    std: list[float] = Field(description="standard deviation of q(z|x), latent_dim values (> 0)")
    resized: bool = Field(description="true if the image was converted to the model's mode or size")


class EncodeResponse(BaseModel):
    model: str
    latent_dim: int = Field(description="length of each mean and std")
    results: list[EncodeResult]


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    status: Literal["ready"] = "ready"
    models: list[str]
