"""Request parameters and response bodies of the API (they are also its OpenAPI schema)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from aex.errors import BadParameterError
from worker.protocol import ApiStatus, JobKind


class ClassifyParams(BaseModel):
    """Multipart form fields of POST /v1/classify."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    image: Any = Field(None, json_schema_extra={"type": "string", "format": "binary"},
                       description="the image: PNG, JPEG, TIFF, BMP or WebP (grey, RGB, RGBA, palette, 16-bit)")
    model: str | None = Field(None, description="served model name (GET /v1/models); default: AEX_DEFAULT_MODEL "
                                                "or the first by name")
    top_k: int = Field(5, ge=1, le=1000, description="how many of the most probable classes to list")


class ExplainParams(BaseModel):
    """Multipart form fields of POST /v1/explain."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    image: Any = Field(None, json_schema_extra={"type": "string", "format": "binary"},
                       description="the image: PNG, JPEG, TIFF, BMP or WebP (grey, RGB, RGBA, palette, 16-bit)")
    model: str | None = Field(None, description="served model name; default as for /v1/classify")
    targets: list[str] = Field(["predicted", "runner-up"],
                               description="comma-separated: predicted, runner-up, all, class names or indices")
    rho: float = Field(0.1, gt=0.0, le=10.0, description="perturbation budget, RMS of delta in [0, 1] pixels")
    steps: int = Field(35, ge=1, description="search steps S (at most AEX_MAX_EXPLAIN_STEPS)")
    layer: str | None = Field(None, description="Grad-CAM layer, dotted module name (default: the model's)")

    @field_validator("targets", mode="before")
    @classmethod
    def _split_targets(cls, value):
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            return [s.strip() for v in value for s in str(v).split(",") if s.strip()]
        return value

    @field_validator("layer", "model", mode="before")
    @classmethod
    def _blank_is_none(cls, value):
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
            schema["properties"][name] = {"type": "string", "default": ",".join(prop.get("default", [])),
                                          "description": prop.get("description", ""), "title": prop.get("title", name)}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


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
    result: dict[str, Any] | None = Field(None, description="when finished: probabilities, per-target "
                                                            "probabilities before/after, rms(delta), image URLs")
    images: dict[str, str] | None = Field(None, description="name -> URL of each PNG (explain jobs)")
    error: ErrorBody | None = None
