"""The results of classify and explain jobs as typed, torch-free models (what rq stores and ``JobView.result`` shows).

The worker builds them (``worker.compute``, ``worker.explaining``) and hands rq their
``dump()``; the API reads them back and documents them in its OpenAPI schema. A result shows
the keys it was computed with, and only those: a field the worker did not set (a classify
without stability, an explain job's DICOM names on an image input, the URLs the job view
adds) is left out of the JSON, never written as null. Every model keeps keys it does not
name (``extra="allow"``): a key a newer worker adds passes through unchanged instead of
failing the API.

Every number of a result is finite: each model refuses a NaN or an infinity anywhere in what it
is given (its fields and kept keys, nested parts and free-form dicts alike) with
NonFiniteResultError (``non_finite_result``) naming where, before any field is validated, and
``dump`` checks again what rq is handed. So a job whose computation went non-finite fails with
that code; it never finishes with a null where a number was.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    model_serializer,
    model_validator,
)

from jobs.finite import check_finite
from jobs.params import ClassifyParameters, ExplainParameters, StabilityMode

# Set while a model validates what an outer model checked already (``ResultModel._finite``).
_CHECKED: ContextVar[bool] = ContextVar("aex_result_checked", default=False)


class ResultModel(BaseModel):
    """A part of a result: unknown keys kept, only the keys that were set are written, and no
    number that is not finite (``check_finite``)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())
    _json: dict[str, Any] | None = PrivateAttr(default=None)  # ``from_json``'s, until the first dump

    @model_validator(mode="wrap")
    @classmethod
    def _finite(cls, data: Any, handler: Any) -> Any:
        # Before the fields are validated: the whole input, the keys no field names included;
        # once, by the outermost model (the nested ones' inputs are parts of its input: each
        # checked again walked the result once per level, ~700 values a classify, 11 times).
        if _CHECKED.get():
            return handler(data)
        check_finite(data, f"the {cls.__name__}")
        token = _CHECKED.set(True)
        try:
            return handler(data)
        finally:
            _CHECKED.reset(token)

    @model_serializer(mode="wrap")
    def _as_computed(self, handler):
        data = handler(self)
        if not isinstance(data, dict):
            return data
        named = type(self).model_fields
        return {k: v for k, v in data.items() if k in self.model_fields_set or k not in named}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Any:
        """Validated from ``data``, JSON values already in the shape of the dump (only the
        keys set, JSON types: what ``dump`` would give back; checked for a classify result,
        ``tests/worker/test_compute.py``), which the model keeps and its first ``dump`` hands
        over instead of checking and writing it out again: 0.23 ms a classify result, about
        5% of the worker's CPU per job at batch 16. Setting a field drops it; a part nested
        in it must not be changed before that dump."""
        model = cls.model_validate(data)
        model._json = data
        return model

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name != "_json":
            super().__setattr__("_json", None)

    def dump(self) -> dict[str, Any]:
        """The JSON dict rq stores and a client sees (checked again: a part set after
        validation passes the same check); the first dump of a result made ``from_json``
        hands that JSON over as it is."""
        data, self._json = self._json, None
        if data is not None:
            return data
        check_finite(self, f"the {type(self).__name__}")
        return self.model_dump(mode="json")


class ClassScore(ResultModel):
    class_index: int
    class_name: str
    prob: float = Field(description="softmax probability")


class StabilitySettings(ResultModel):
    steps: int
    eps: float
    overshoot: float
    momentum: float
    mode: StabilityMode = Field(description="the mode that ran (a fast request with S other than 450 runs exact)")
    fast: dict[str, Any] | None = Field(None, description="the fast search's own parameters (mode fast only)")


class StabilityReference(ResultModel):
    n: int | None = None
    seed: int | None = None
    data: Any = None
    settings: dict[str, Any] = Field(default_factory=dict)


class Stability(ResultModel):
    """The stability score of the decision: the two minimal radii and their percentiles."""

    predicted: int
    attack_rms: float | None = Field(description="rms of the smallest perturbation that flips the decision")
    attack_found: bool
    attack_percentile: float | None
    btr_rms: float | None = Field(description="rms of the smallest perturbation making it no better than chance")
    btr_found: bool
    btr_percentile: float | None
    reference_n: int
    settings: StabilitySettings
    predicted_name: str
    reference: StabilityReference | None = Field(description="the checkpoint's recorded radii ranked against")
    comparable: bool
    summary: str | None


class Architecture(ResultModel):
    arch: str
    input_size: int
    in_channels: int
    num_classes: int


class DeviceInfo(ResultModel):
    type: str
    index: int | None = None
    name: str | None = None
    torch_threads: int | None = None


class InputInfo(ResultModel):
    """The input as decoded: an image (format, mode, width, height) or a DICOM file (how its
    pixels became the model's view; no patient or study identifier)."""

    format: str
    mode: str | None = None
    width: int | None = None
    height: int | None = None
    sop_class: str | None = None
    modality: str | None = None
    photometric_interpretation: str | None = None
    rows: int | None = None
    columns: int | None = None
    bits_stored: int | None = None
    samples_per_pixel: int | None = None
    transfer_syntax: str | None = None
    rescale_slope: float | None = None
    rescale_intercept: float | None = None
    window: list[float] | None = None
    inverted: bool | None = None


class RecordedClassifyParameters(ClassifyParameters):
    """A classify job's parameters as its result records them (a key a newer worker records is kept)."""

    model_config = ConfigDict(extra="allow")


class RecordedExplainParameters(ExplainParameters):
    """An explain job's parameters as its result records them (a key a newer worker records is kept)."""

    model_config = ConfigDict(extra="allow")


def _kind(value: Any, explain_model: type[BaseModel]) -> str:
    """ "explain" or "classify": the kind of a model or of its JSON (only an explain one has targets)."""
    if isinstance(value, BaseModel):
        return "explain" if isinstance(value, explain_model) else "classify"
    return "explain" if isinstance(value, dict) and "targets" in value else "classify"


def _parameters_kind(value: Any) -> str:
    return _kind(value, ExplainParameters)


RecordedParameters = Annotated[
    Annotated[RecordedClassifyParameters, Tag("classify")] | Annotated[RecordedExplainParameters, Tag("explain")],
    Discriminator(_parameters_kind),
]


class Provenance(ResultModel):
    """Which model, file, parameters, input, software and device, and how long each part took."""

    kind: Literal["classify", "explain"]
    model: str
    checkpoint_file: str
    checkpoint_sha256: str
    weights_sha256: str | None
    checkpoint_metrics: dict[str, Any] = Field(
        description="the checkpoint's scalar metrics; its full record is GET /v1/models/{model} for this checkpoint_sha256"
    )
    architecture: Architecture
    parameters: RecordedParameters = Field(description="the canonical parameters (the cache key's)")
    method: dict[str, Any] = Field(description="every setting the computation used, defaults included")
    input_sha256: str
    input: InputInfo
    software: dict[str, str | None]
    device: DeviceInfo
    determinism: dict[str, Any]
    timings: dict[str, float] = Field(description="seconds of each part")
    cache_key: str
    computed_at: str = Field(description="ISO 8601 time the result was computed")
    worker: str | None


class ClassifyResult(ResultModel):
    """The result of a classify job."""

    model: str
    predicted: ClassScore
    top: list[ClassScore] = Field(description="the top_k most probable classes, most probable first")
    probs: dict[str, float] = Field(description="class name -> probability")
    stability: Stability | None = Field(None, description="with stability only")
    reused: bool = Field(description="answered from an identical earlier request's result")
    provenance: Provenance
    seconds: float


class Faithfulness(ResultModel):
    """Deletion and insertion AUCs of a map beside a random pixel order's, with the curves."""

    class_index: int
    deletion_auc: float
    insertion_auc: float
    random_deletion_auc: float
    random_insertion_auc: float
    deletion_curve: list[float]
    insertion_curve: list[float]
    random_deletion_curve: list[float]
    random_insertion_curve: list[float]


class Gradcam(ResultModel):
    layer: str
    class_index: int
    faithfulness: Faithfulness | None = None


class ExplainSettings(ResultModel):
    rho: float
    steps: int
    overshoot: float
    momentum: float
    clamp: bool
    bound_check: bool


class Target(ResultModel):
    """One adversarial explanation: x + delta toward a class, its PNGs, DICOM objects and URLs."""

    role: str = Field(description="predicted, runner-up, class")
    class_index: int
    class_name: str
    rms: float = Field(description="rms of delta")
    prob_before: float
    prob_after: float
    predicted_after: int
    image: str = Field(description="file name of x + delta (PNG)")
    difference: str = Field(description="file name of the amplified difference (PNG)")
    faithfulness: Faithfulness | None = None
    dicom: str | None = Field(None, description="DICOM input: the Secondary Capture of x + delta")
    dicom_difference: str | None = Field(None, description="DICOM input: the Secondary Capture of the difference")
    image_url: str | None = Field(None, description="added by the job view")
    difference_url: str | None = Field(None, description="added by the job view")
    dicom_url: str | None = Field(None, description="added by the job view")
    dicom_difference_url: str | None = Field(None, description="added by the job view")


class ExplainFiles(ResultModel):
    input: str
    gradcam: str | None = None
    gradcam_overlay: str | None = None


class DicomObject(ResultModel):
    name: str
    role: str
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str


class StoredObject(ResultModel):
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    status: str | None = None


class StoreError(ResultModel):
    code: str
    message: str


class StoredReport(ResultModel):
    """What storing the DICOM objects back to the source's PACS gave."""

    pacs: str
    via: str | None = None
    stored: int
    failed: int
    objects: list[StoredObject] | None = None
    error: StoreError | None = None


class ExplainResult(ResultModel):
    """The result of an explain job."""

    model: str
    gradcam: Gradcam
    predicted: ClassScore
    runner_up: ClassScore
    probs: dict[str, float]
    settings: ExplainSettings
    targets: list[Target]
    files: ExplainFiles
    faithfulness: dict[str, Any] | None = Field(None, description="how each map's figures are defined")
    stability: Stability
    dicom_files: list[str] | None = Field(None, description="DICOM input: names of the DICOM objects")
    dicom_objects: list[DicomObject] | None = None
    dicom_error: str | None = Field(None, description="DICOM input: why no DICOM object could be derived")
    dicom_warnings: list[str] | None = Field(
        None,
        description="DICOM input: each malformed attribute of the source, by keyword (never its value), "
        "and whether the DICOM objects leave it empty, leave it out or carry a UID derived from it",
    )
    seconds: float
    reused: bool
    provenance: Provenance
    stored: StoredReport | None = Field(None, description="input from a PACS: the store of the results")


def result_kind(value: Any) -> str:
    """ "explain" or "classify": the kind of a result (a model or its JSON)."""
    return _kind(value, ExplainResult)


JobResult = Annotated[
    Annotated[ClassifyResult, Tag("classify")] | Annotated[ExplainResult, Tag("explain")],
    Discriminator(result_kind),
]
