"""Request parameters and response bodies of the API (they are also its OpenAPI schema)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator, model_validator

from jobs.params import STABILITY_MODES, StabilityMode
from jobs.queues import JobKind
from jobs.results import JobResult
from jobs.states import ApiStatus
from models.defaults import ARA_STEPS, EXPLAIN_RHO, EXPLAIN_STEPS, REQUEST_TARGETS
from models.errors import BadParameterError
from models.explain.targets import split_specs

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
    # The enum inlined in the schema: the form's schema is copied into the route's (no $defs).
    stability_mode: (
        Annotated[StabilityMode, WithJsonSchema({"type": "string", "enum": list(STABILITY_MODES)})] | None
    ) = Field(
        None,
        description="how the stability radii are found: fast (an estimate of the ARA searches' radii in a fraction "
        "of their time) or exact (the ARA's two searches); default AEX_STABILITY_MODE",
        title="Stability Mode",  # as pydantic titles the other fields (WithJsonSchema drops it)
    )
    pacs: str | None = Field(
        None,
        description="instead of an image: the name of a configured PACS (AEX_PACS) to fetch the instance from by "
        "WADO-RS; give study_uid, series_uid and instance_uid too",
    )
    study_uid: str | None = Field(None, description="with pacs: the Study Instance UID")
    series_uid: str | None = Field(None, description="with pacs: the Series Instance UID")
    instance_uid: str | None = Field(None, description="with pacs: the SOP Instance UID")
    store: bool | None = Field(
        None,
        description="explain with pacs: store the result objects (Parametric Map, Secondary Captures, SR) back to "
        "that PACS (default true for a PACS input)",
    )
    callback_url: str | None = Field(
        None,
        description="http(s) URL that receives a JSON POST when the job "
        "ends; its host must be on AEX_CALLBACK_ALLOWED_HOSTS",
    )

    @field_validator("model", "callback_url", "pacs", "study_uid", "series_uid", "instance_uid", mode="before")
    @classmethod
    def _blank_is_none(cls, value):
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _reference_whole(self):
        uids = (self.study_uid, self.series_uid, self.instance_uid)
        if self.pacs is not None and None in uids:
            raise ValueError("with pacs, give study_uid, series_uid and instance_uid")
        if self.pacs is None and any(u is not None for u in uids):
            raise ValueError("study_uid, series_uid and instance_uid go with pacs")
        if self.store is not None and self.pacs is None:
            raise ValueError("store applies to an input from a PACS (pacs)")
        return self

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


def repeatable_fields(model: type[BaseModel]) -> frozenset[str]:
    """The form fields that may be given more than once (list-valued: ``targets``, whose
    values are joined); every other field takes one value."""
    return frozenset(name for name, f in model.model_fields.items() if get_origin(f.annotation) is list)


def parse_params(model: type[BaseModel], fields: dict[str, Any]) -> BaseModel:
    """Validate form fields; any problem is a 400 with every message (a single-valued field
    given more than once is one: it is never silently turned into a list or the last value)."""
    repeatable = repeatable_fields(model)
    repeated = sorted(
        k for k, v in fields.items() if isinstance(v, list) and k in model.model_fields and k not in repeatable
    )
    if repeated:
        raise BadParameterError(
            "; ".join(f"{k}: given {len(fields[k])} times, this field takes one value" for k in repeated)
        )
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'form'}: {e['msg']}" for e in exc.errors())
        raise BadParameterError(problems) from None


# The declared types of the ``image`` part (any is read; the bytes decide: ``service.uploads``).
IMAGE_CONTENT_TYPES = (
    "image/png, image/jpeg, image/tiff, image/bmp, image/webp, application/dicom, application/octet-stream"
)


def multipart_openapi(model: type[BaseModel]) -> dict[str, Any]:
    """openapi_extra documenting a multipart body with ``model``'s fields (the routes read
    the body themselves, in memory, with a size limit and a deadline), as a form can carry
    them: every field is text given at most once (a left-out field is unset, there is no
    null), except ``image``, the file part, and a list field, one comma-separated text that
    may be repeated; window_center and window_width come together."""
    schema = model.model_json_schema()
    schema["required"] = ["image"]
    for name, prop in schema.get("properties", {}).items():
        if prop.get("type") == "array":
            schema["properties"][name] = {
                "type": "string",
                "default": ",".join(prop.get("default", [])),
                "description": prop.get("description", ""),
                "title": prop.get("title", name),
            }
        elif "anyOf" in prop:
            # X | None: the field is X when given (unset when left out).
            kept = [alt for alt in prop["anyOf"] if alt.get("type") != "null"]
            if len(kept) == 1:
                rest = {k: v for k, v in prop.items() if k not in ("anyOf", "default")}
                schema["properties"][name] = {**kept[0], **rest}
    if {"window_center", "window_width"} <= set(schema.get("properties", {})):
        schema["dependentRequired"] = {"window_center": ["window_width"], "window_width": ["window_center"]}
    media = {"schema": schema, "encoding": {"image": {"contentType": IMAGE_CONTENT_TYPES}}}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": media}}}


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


# The error answers every /v1 route may give (documented in the OpenAPI schema).
ERRORS: dict[int | str, dict] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 408, 413, 415, 422, 429, 503)
}


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
    result: JobResult | None = Field(
        None,
        description="when finished: the classify result (probabilities, stability, provenance, reused) or the "
        "explain result (per-target probabilities before/after, rms(delta), each map's faithfulness "
        "(deletion/insertion AUCs beside a random order), image and DICOM names and URLs, stability, "
        "provenance, reused)",
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
