"""The canonical parameters of a job (frozen models, one ``StabilityMode``) and the key of its result.

A job's parameters are built once, by the API (and by ``aex explain --checkpoint``), as a
``ClassifyParameters`` or ``ExplainParameters``; every default (steps, stability mode) is
applied there, by the model, and nowhere after. Their ``kwargs()`` (JSON) are the rq job's
keyword arguments, the result's provenance records them and the result is keyed on them. The
worker reads them back with ``from_kwargs``. Same input bytes + same checkpoint file + same
parameters (+ same aex version) = same result, which is then served again instead of being
recomputed."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.defaults import ARA_STEPS, STABILITY_MODE, StabilityMode
from models.errors import BadParameterError
from models.explain.targets import split_specs

DEFAULT_STABILITY_MODE = STABILITY_MODE
STABILITY_MODES = tuple(m.value for m in StabilityMode)

# (window centre, window width) of a DICOM input, in modality units.
Window = tuple[float, float]


def _problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'parameters'}: {e['msg']}" for e in exc.errors())


class JobParameters(BaseModel):
    """What both kinds of parameters share: frozen, no unknown field, ``kwargs()``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @field_validator("stability_mode", mode="before", check_fields=False)
    @classmethod
    def _known_mode(cls, value: Any) -> Any:
        if value is not None and value not in STABILITY_MODES:
            raise ValueError(f"stability_mode must be one of {', '.join(STABILITY_MODES)}, got {value!r}")
        return value

    @classmethod
    def build(cls, **values: Any) -> Self:
        """The parameters from ``values``; a bad value is a ``BadParameterError`` (400)."""
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise BadParameterError(_problems(exc)) from None

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> Self:
        """The parameters of an rq job from its keyword arguments (which also name the model
        and, for explain jobs, the result TTL: not parameters)."""
        return cls.build(**{k: v for k, v in kwargs.items() if k in cls.model_fields})

    def kwargs(self) -> dict[str, Any]:
        """The canonical JSON dict: the rq job's keyword arguments, the provenance's
        "parameters" and the cache key's material (``result_cache_key``)."""
        return self.model_dump(mode="json")


class ClassifyParameters(JobParameters):
    """The parameters of a classify job; ``stability_steps`` and ``stability_mode`` are set
    with ``stability`` only (None without it)."""

    top_k: int = Field(5, ge=1)
    stability: bool = False
    stability_steps: int | None = Field(None, ge=1)
    stability_mode: StabilityMode | None = None
    window: Window | None = None

    @model_validator(mode="before")
    @classmethod
    def _stability_defaults(cls, values: Any) -> Any:
        if not isinstance(values, Mapping):
            return values
        values = dict(values)
        if values.get("stability"):
            values["stability_steps"] = values.get("stability_steps") or ARA_STEPS
            values["stability_mode"] = values.get("stability_mode") or DEFAULT_STABILITY_MODE
        else:
            values["stability_steps"] = values["stability_mode"] = None
        return values


class ExplainParameters(JobParameters):
    """The parameters of an explain job (the stability score is always computed); ``layer``
    is the resolved Grad-CAM layer name (the default one named)."""

    targets: list[str]
    rho: float
    steps: int = Field(ge=1)
    layer: str | None = None
    stability_steps: int = Field(ARA_STEPS, ge=1)
    stability_mode: StabilityMode = DEFAULT_STABILITY_MODE
    window: Window | None = None

    @field_validator("targets", mode="before")
    @classmethod
    def _split_targets(cls, value: Any) -> Any:
        return [str(t) for t in split_specs(value)]

    @field_validator("stability_steps", "stability_mode", mode="before")
    @classmethod
    def _unset_is_default(cls, value: Any, info) -> Any:
        if value is None:  # a job queued without them: the defaults, here and only here
            return ARA_STEPS if info.field_name == "stability_steps" else DEFAULT_STABILITY_MODE
        return value


def _window(window_center: float | None, window_width: float | None) -> Window | None:
    return None if window_center is None else (window_center, window_width)


def classify_parameters(
    top_k: int,
    stability: bool,
    stability_steps: int,
    window_center: float | None = None,
    window_width: float | None = None,
    stability_mode: str | None = None,
) -> dict[str, Any]:
    """``ClassifyParameters(...).kwargs()``: the canonical parameters of a classify job
    (stability_steps and stability_mode only with stability)."""
    return ClassifyParameters.build(
        top_k=top_k,
        stability=bool(stability),
        stability_steps=stability_steps,
        stability_mode=stability_mode,
        window=_window(window_center, window_width),
    ).kwargs()


def explain_parameters(
    targets: list[str],
    rho: float,
    steps: int,
    layer: str | None,
    stability_steps: int,
    window_center: float | None = None,
    window_width: float | None = None,
    stability_mode: str | None = None,
) -> dict[str, Any]:
    """``ExplainParameters(...).kwargs()``: the canonical parameters of an explain job."""
    return ExplainParameters.build(
        targets=targets,
        rho=rho,
        steps=steps,
        layer=layer,
        stability_steps=stability_steps,
        stability_mode=stability_mode,
        window=_window(window_center, window_width),
    ).kwargs()


def result_cache_key(
    kind: str,
    model: str,
    checkpoint_sha256: str,
    input_sha256: str,
    parameters: Mapping[str, Any] | JobParameters,
    version: str,
) -> str:
    """sha256 of everything a result depends on, as canonical JSON (``parameters``: a model, or
    its ``kwargs()``, plus what the caller adds for an input by reference)."""
    material = {
        "kind": kind,
        "model": model,
        "checkpoint_sha256": checkpoint_sha256,
        "input_sha256": input_sha256,
        "parameters": parameters.kwargs() if isinstance(parameters, JobParameters) else dict(parameters),
        "aex": version,
    }
    blob = json.dumps(material, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(blob.encode()).hexdigest()
