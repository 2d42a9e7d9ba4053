"""Admission: what is checked before a job is queued (the upload, the parameters, the targets,
the callback, the queue's capacity), so that a bad request is a precise 4xx and never a
failed job."""

from __future__ import annotations

from typing import Any

from redis import Redis

from jobs.callbacks import callback_meta, check_callback_url
from jobs.crypto import cipher_from_settings
from jobs.params import StabilityMode
from jobs.queues import QUEUE_NAMES, JobKind
from jobs.rqueue import queue_depth
from jobs.rqueue.layout import live_worker_keys
from jobs.settings import Settings
from models.data.imaging import prepare_array, prepare_strips
from models.data.samples import scaled_by_range
from models.errors import BadParameterError, QueueFullError, ServiceUnavailableError
from models.explain.targets import count_rows, parse_targets
from pacs.read import check_reference
from service.multipart import Upload
from service.schemas import CommonParams, ExplainParams
from service.uploads import check_dicom, check_image, is_dicom_upload


def check_capacity(
    conn: Redis, kind: JobKind, settings: Settings, depth: int | None = None, served: bool | None = None
) -> None:
    """503 when no live worker serves the queue of lane ``kind``, 429 when it is at its depth
    (``depth`` and ``served``: as read with other things, else read here)."""
    check_served(conn, kind, served)
    if depth is None:
        depth = queue_depth(conn, kind)
    if depth >= settings.max_queue_depth:
        raise QueueFullError(
            f"the {kind.value} queue holds {depth} jobs (AEX_MAX_QUEUE_DEPTH = {settings.max_queue_depth}); retry later"
        )


def check_served(conn: Redis, kind: JobKind, served: bool | None = None) -> None:
    """503 when no live worker serves the queue of lane ``kind`` (``served``: as known, else read here)."""
    if served is None:
        served = bool(live_worker_keys(conn, QUEUE_NAMES[kind]))
    if not served:
        raise ServiceUnavailableError(f"no worker is serving the {kind.value} queue; start one with `aex worker`")


def check_input(upload: Upload, params: CommonParams, settings: Settings, entry: dict[str, Any]) -> str:
    """Refuse a bad upload (or PACS reference) before anything is queued; returns "dicom" or
    "image". The upload is decoded and turned into the input of the model ``entry`` (its
    catalogue entry: input_size, in_channels) by the workers' own torch-free functions, so an
    input the network could not take (``models.data.imaging.check_model_input``: not finite,
    or outside [0, 1]) is a 422 here rather than a failed job. An instance named in a PACS is
    checked here without the network (the PACS is configured and readable, the UIDs are
    UIDs); the worker fetches it and runs the same checks as on an upload."""
    if params.pacs is not None:
        if upload.filename is not None or upload.data:
            raise BadParameterError("give either an image or a PACS reference (pacs and the three UIDs), not both")
        check_reference(settings.pacs, params.pacs, params.study_uid, params.series_uid, params.instance_uid)
        return "dicom"
    # The worker checks the same again (a published entry always names both).
    size, channels = entry.get("input_size") or 0, entry.get("in_channels") or 0
    if is_dicom_upload(upload):
        dicom = check_dicom(upload.data, settings, params.window)
        if size and channels:
            width, height = dicom.size
            prepare_strips(width, height, dicom.strips, int(size), int(channels))
        return "dicom"
    if params.window is not None:
        raise BadParameterError("window_center / window_width apply to DICOM input only")
    img = check_image(upload.data, settings)
    if size and channels and scaled_by_range(img):  # any other is in [0, 1] by its type
        prepare_array(img, int(size), int(channels))
    return "image"


def stability_steps(params: CommonParams, settings: Settings) -> int:
    """The steps of each stability search: the request's, at most AEX_MAX_EXPLAIN_STEPS, or
    AEX_STABILITY_STEPS."""
    if params.stability_steps is None:
        return settings.stability_steps
    if params.stability_steps > settings.max_explain_steps:
        raise BadParameterError(
            f"stability_steps = {params.stability_steps} is over the limit of "
            f"{settings.max_explain_steps} (AEX_MAX_EXPLAIN_STEPS)"
        )
    return params.stability_steps


def stability_mode(params: CommonParams, settings: Settings) -> StabilityMode:
    """How the stability radii are found: the request's mode, or AEX_STABILITY_MODE (the
    service's configured default, applied here once; ``jobs.params`` holds the built-in one)."""
    return StabilityMode(params.stability_mode or settings.stability_mode)


def job_meta(input_format: str, params: CommonParams, settings: Settings) -> dict[str, Any]:
    """What the job keeps in its meta: the input format and the checked callback (its URL
    sealed with AEX_DATA_KEY, ``jobs.callbacks.callback_meta``)."""
    meta: dict[str, Any] = {"input_format": input_format}
    if params.pacs is not None:
        ref = check_reference(settings.pacs, params.pacs, params.study_uid, params.series_uid, params.instance_uid)
        meta["pacs_reference"] = ref.as_dict()  # names and UIDs only: no address, no secret
        meta["store"] = True if params.store is None else bool(params.store)
    if params.callback_url is not None:
        url = check_callback_url(params.callback_url, settings.callback_allowed_hosts)
        meta["callback"] = callback_meta(
            url,
            settings.callback_attempts,
            settings.callback_timeout,
            settings.callback_backoff_seconds,
            settings.result_ttl,
            settings.public_url,
            cipher_from_settings(settings.data_key),  # sealed: its query may hold a token
        )
    return meta


def check_targets(targets: list[str], entry: dict[str, Any], max_rows: int) -> None:
    """400 for a target the workers would refuse (the one grammar, ``models.explain.targets``),
    or for more explanations to render than AEX_MAX_EXPLAIN_ROWS (``all`` counts every class,
    a repeated target counts each time: each one is rendered)."""
    classes = entry["classes"]
    rendered, _ = count_rows(parse_targets(targets, classes), len(classes))
    if rendered > max_rows:
        raise BadParameterError(
            f"{rendered} explanations to render, over the limit of {max_rows} (AEX_MAX_EXPLAIN_ROWS)"
        )


def check_explain(params: ExplainParams, entry: dict[str, Any], settings: Settings) -> str | None:
    """400 for explain parameters the workers would refuse or that are over the limits;
    returns the Grad-CAM layer by name (the default one named, so that naming it or not is
    the same request)."""
    if params.steps > settings.max_explain_steps:
        raise BadParameterError(
            f"steps = {params.steps} is over the limit of {settings.max_explain_steps} (AEX_MAX_EXPLAIN_STEPS)"
        )
    check_targets(params.targets, entry, settings.max_explain_rows)
    if params.layer is not None and "layers" in entry and params.layer not in entry["layers"]:
        raise BadParameterError(
            f"model {entry['name']!r} has no layer {params.layer!r} (the default is "
            f"{entry.get('gradcam_layer')!r}; GET /v1/models/{entry['name']} lists them)"
        )
    return params.layer or entry.get("gradcam_layer")
