"""Request parameters and response bodies of the API (they are also its OpenAPI schema)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.defaults import ARA_STEPS, EXPLAIN_RHO, EXPLAIN_STEPS, REQUEST_TARGETS
from models.errors import BadParameterError
from models.explain.targets import split_specs
from worker.queues import JobKind
from worker.states import ApiStatus

IMAGE_DESCRIPTION = (
    "the image: PNG, JPEG, TIFF, BMP or WebP (grey, RGB, RGBA, palette, 16-bit), or a "
    "single-frame DICOM file (recognised by its DICM header, a .dcm name or application/dicom)"
)


class CommonParams(BaseModel):
    """Fields both POST /v1/classify and POST /v1/explain take."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    image: Any = Field(None, json_schema_extra={"type": "string", "format": "binary"}, description=IMAGE_DESCRIPTION)
    model: str | None = Field(
        None, description="served model name (GET /v1/models); default: AEX_DEFAULT_MODEL or the first by name"
    )
    window_center: float | None = Field(
        None,
        description="DICOM only: VOI window centre overriding the file's "
        "(in modality units, e.g. HU); give window_width too",
    )
    window_width: float | None = Field(
        None, gt=0.0, description="DICOM only: VOI window width overriding the file's; give window_center too"
    )
    stability_steps: int | None = Field(
        None,
        ge=1,
        description=f"steps of each stability search (default AEX_STABILITY_STEPS = {ARA_STEPS}, the ARA setting)",
    )
    callback_url: str | None = Field(
        None,
        description="http(s) URL that receives a JSON POST when the job "
        "ends; its host must be on AEX_CALLBACK_ALLOWED_HOSTS",
    )

    @field_validator("model", "callback_url", mode="before")
    @classmethod
    def _blank_is_none(cls, value):
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _window_pair(self):
        if (self.window_center is None) != (self.window_width is None):
            raise ValueError("give both window_center and window_width, or neither")
        return self

    @property
    def window(self) -> tuple[float, float] | None:
        return None if self.window_center is None else (self.window_center, self.window_width)


class ClassifyParams(CommonParams):
    """Multipart form fields of POST /v1/classify."""

    top_k: int = Field(5, ge=1, le=1000, description="how many of the most probable classes to list")
    stability: bool = Field(
        False,
        description="also compute the stability score (two searches: seconds, not "
        "milliseconds; the answer is then usually 202)",
    )


class ExplainParams(CommonParams):
    """Multipart form fields of POST /v1/explain (the stability score is always computed)."""

    targets: list[str] = Field(
        list(REQUEST_TARGETS), description="comma-separated: predicted, runner-up, all, class names or indices"
    )
    rho: float = Field(EXPLAIN_RHO, gt=0.0, le=10.0, description="perturbation budget, RMS of delta in [0, 1] pixels")
    steps: int = Field(EXPLAIN_STEPS, ge=1, description="search steps S (at most AEX_MAX_EXPLAIN_STEPS)")
    layer: str | None = Field(None, description="Grad-CAM layer, dotted module name (default: the model's)")

    @field_validator("targets", mode="before")
    @classmethod
    def _split_targets(cls, value):
        return [str(s) for s in split_specs(value)] if isinstance(value, (str, list)) else value

    @field_validator("layer", mode="before")
    @classmethod
    def _blank_layer_is_none(cls, value):
        return None if isinstance(value, str) and not value.strip() else value


def parse_params(model: type[BaseModel], fields: dict[str, Any]) -> BaseModel:
    """Validate form fields; any problem is a 400 with every message."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'form'}: {e['msg']}" for e in exc.errors())
        raise BadParameterError(problems) from None


def multipart_openapi(model: type[BaseModel]) -> dict[str, Any]:
    """openapi_extra documenting a multipart body with ``model``'s fields (the routes read
    the body themselves, in memory and with a size limit)."""
    schema = model.model_json_schema()
    schema["required"] = ["image"]
    # A list field arrives as one comma-separated text field.
    for name, prop in schema.get("properties", {}).items():
        if prop.get("type") == "array":
            schema["properties"][name] = {
                "type": "string",
                "default": ",".join(prop.get("default", [])),
                "description": prop.get("description", ""),
                "title": prop.get("title", name),
            }
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


# The error answers every /v1 route may give (documented in the OpenAPI schema).
ERRORS: dict[int | str, dict] = {code: {"model": ErrorResponse} for code in (400, 404, 413, 415, 422, 429, 503)}


class Progress(BaseModel):
    done: int
    total: int
    phase: str | None = None


class Timings(BaseModel):
    enqueued_at: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    queued_seconds: float | None = Field(None, description="from enqueue to start")
    run_seconds: float | None = Field(None, description="from start to end (or to now while running)")


class JobView(BaseModel):
    """A job as GET /v1/jobs/{id} shows it."""

    model_config = ConfigDict(protected_namespaces=())

    id: str
    url: str
    kind: JobKind | None
    status: ApiStatus
    model: str | None = None
    queue_position: int | None = Field(None, description="0 = next to run; only while queued")
    progress: Progress | None = None
    timings: Timings
    result: dict[str, Any] | None = Field(
        None,
        description="when finished: probabilities, per-target "
        "probabilities before/after, rms(delta), image URLs, "
        "stability, provenance, reused",
    )
    images: dict[str, str] | None = Field(None, description="name -> URL of each PNG (explain jobs)")
    dicom: dict[str, str] | None = Field(
        None, description="name -> URL of each DICOM Secondary Capture object (explain jobs on DICOM input)"
    )
    callback: dict[str, Any] | None = Field(
        None,
        description="delivery of the callback_url POST: url, state "
        "(waiting, pending, retrying, delivered, failed), "
        "attempts, last_status, last_error",
    )
    error: ErrorBody | None = None
