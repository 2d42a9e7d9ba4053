"""Job functions, enqueued by dotted path ("worker.tasks.classify", "worker.tasks.explain").

Each takes small JSON-safe keyword arguments: the canonical parameters the API built with
``jobs.params.classify_parameters`` / ``explain_parameters``. The upload is read from
Redis (the API stored it sealed under ``upload_key(job_id)``, and said in
``job.meta["input_format"]`` whether it is DICOM); the worker process deletes it once the job
has ended for good (not when its run is cut short and it is queued again: ``jobs.failures``).
What is computed comes from ``worker.compute``; here it is wired to the job: progress and
cancellation through job.meta, PNGs and DICOM objects stored sealed (``jobs.crypto``, one
blob per hash field) in Redis hashes with the result TTL. The job's cache key
(``job.meta["cache_key"]``) is what the worker process indexes the finished result by.
Models come from the process's ``ServedModels``, and the data cipher from AEX_DATA_KEY,
both installed once before the work loop.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from jobs.crypto import blob_context
from jobs.keys import cancel_key, dicom_key, images_key, upload_key
from jobs.params import ClassifyParameters, ExplainParameters
from jobs.queues import JOB_FUNCTIONS, JobKind
from jobs.rqueue.progress import save_progress
from jobs.rqueue.worker import current_job
from models.errors import BadParameterError, JobCancelledError
from pacs.read import fetch_reference
from pacs.store import store_report
from worker.compute import classify_result, classify_results
from worker.context import Prepared, current
from worker.explaining import explain_result, explain_results

if TYPE_CHECKING:
    from rq.job import Job

PROGRESS_EVERY_SECONDS = 0.2


def seal_fields(redis_key: str, files: dict[str, bytes]) -> dict[str, bytes]:
    """``files`` sealed for the hash ``redis_key``, each bound to its field name."""
    cipher = current().cipher
    return {name: cipher.seal(data, blob_context(redis_key, name)) for name, data in files.items()}


def _current_job() -> Job:
    return current_job()


def _check_cancelled(job: Job, starting: bool = False) -> None:
    """Raise JobCancelledError when the job was cancelled; ``starting``: at the job's start,
    where its flag as the worker last read it (with its claim, or after its batch) stands."""
    flag = current().take_cancel_flag(job.id) if starting else None
    if flag is None:
        flag = bool(job.connection.exists(cancel_key(job.id)))
    if current().stop_requested.is_set() or flag:
        raise JobCancelledError(f"job {job.id} was cancelled")


def _read_upload(job: Job) -> bytes:
    """The job's input: the upload stored (sealed) by the API, or for an input by reference
    the instance fetched from its PACS by WADO-RS (same size limit as an upload)."""
    ref = job.meta.get("pacs_reference")
    start = time.perf_counter()
    if ref:
        data = fetch_reference(current().settings.pacs, ref, current().settings.max_upload_bytes)
    else:
        sealed = current().take_upload(job.id)  # read with its claim
        if sealed is None:
            sealed = job.connection.get(upload_key(job.id))
        if sealed is None:
            raise BadParameterError("the uploaded image expired before a worker took the job (raise AEX_UPLOAD_TTL)")
        data = current().cipher.open(sealed, blob_context(upload_key(job.id)))
    current().note_timing(job.id, "read_seconds", time.perf_counter() - start)
    return data


def _with_stage_timings(job: Job, result: dict[str, Any]) -> dict[str, Any]:
    """``result`` (dumped) with the job's stages before its computation (claim, gather, read:
    ``worker.context``) in its provenance's timings."""
    result["provenance"]["timings"].update({k: round(v, 6) for k, v in current().take_timings(job.id).items()})
    return result


class _Progress:
    """Writes job.meta["progress"] = {done, total, phase} at most every PROGRESS_EVERY_SECONDS
    (and at every phase change and at the end), and stops the job when it was cancelled. Only
    while this attempt's claim holds the job (``save_progress``): a worker fenced out (its lease
    ran out while it was cut off) never writes over the meta of the job's later run or end."""

    def __init__(self, job: Job):
        self.job, self.last, self.last_phase = job, 0.0, None

    def __call__(self, done: int, total: int, phase: str) -> None:
        _check_cancelled(self.job)
        t = time.monotonic()
        if done >= total or phase != self.last_phase or t - self.last >= PROGRESS_EVERY_SECONDS:
            self.last, self.last_phase = t, phase
            self.job.meta["progress"] = {"done": int(done), "total": int(total), "phase": phase}
            save_progress(self.job.connection, self.job)  # refused once fenced out: its lease thread stops it


def _keep_cache_key(job: Job, result: dict[str, Any]) -> None:
    """The key the worker indexes the result under (``worker.process``): the one computed from
    the input's bytes and canonical parameters, except for an input by reference, which keeps
    the API's (from the PACS and UIDs and ``store``: what a second request can be matched by
    before anything is fetched), so the same request by reference is answered from this result."""
    if job.meta.get("pacs_reference"):
        return
    job.meta["cache_key"] = result["provenance"]["cache_key"]


def _classify_input(job: Job, kwargs: dict[str, Any]) -> tuple[Any, bytes, str, ClassifyParameters]:
    """(served model, input bytes, input format, canonical parameters) of a classify job."""
    served = current().served.get(kwargs["model"])
    parameters = ClassifyParameters.from_kwargs(kwargs)  # its defaults, for a job queued without them
    return served, _read_upload(job), job.meta.get("input_format", "image"), parameters


def _explain_input(job: Job, kwargs: dict[str, Any]) -> tuple[Any, bytes, str, ExplainParameters]:
    """(served model, input bytes, input format, canonical parameters) of an explain job."""
    served = current().served.get(kwargs["model"])
    parameters = ExplainParameters.from_kwargs(kwargs)  # its defaults, for a job queued without them
    return served, _read_upload(job), job.meta.get("input_format", "image"), parameters


def classify(
    model: str,
    top_k: int = 5,
    stability: bool = False,
    stability_steps: int | None = None,
    window: list[float] | None = None,
    stability_mode: str | None = None,
) -> dict[str, Any]:
    """Class probabilities of the uploaded image under ``model`` (and, with ``stability``,
    its stability score): its share of the batch it ran in (``worker.batching``), else
    computed here."""
    job = _current_job()
    _check_cancelled(job, starting=True)
    prepared = current().take_prepared(job.id)
    if prepared is not None:
        result = prepared.unwrap()
    else:
        kwargs = {"model": model, "top_k": top_k, "stability": stability, "stability_steps": stability_steps}
        kwargs |= {"window": window, "stability_mode": stability_mode}
        served, data, input_format, parameters = _classify_input(job, kwargs)
        result = classify_result(
            served, data, input_format, parameters, progress=_Progress(job), worker=job.worker_name
        )
    result = _with_stage_timings(job, result.dump())  # jobs.results.ClassifyResult as the JSON rq stores
    _keep_cache_key(job, result)
    return result


class _BatchProgress:
    """The progress of a batch, written to each job's meta (``_Progress``). A job cancelled
    meanwhile drops out of the reports (its own run ends it as cancelled); the batch stops
    only when every job of it is cancelled."""

    def __init__(self, batch: list[Job]):
        self.each = {job.id: _Progress(job) for job in batch}

    def __call__(self, done: int, total: int, phase: str) -> None:
        for job_id, progress in list(self.each.items()):
            try:
                progress(done, total, phase)
            except JobCancelledError:
                del self.each[job_id]
        if not self.each:
            raise JobCancelledError("every job of the batch was cancelled")


def prepare_batch(batch: list[Job], worker: str) -> dict[str, Prepared]:
    """Each job's share of one batched computation (``worker.compute.classify_results`` or
    ``worker.explaining.explain_results``): its result, or the error of its own input
    (unreadable, expired, refused by the checks). The jobs share a
    ``worker.batching.batch_signature``: one kind, one model, the same search settings. An
    error of the batch as a whole (cancelled, out of memory, its time limit) propagates: then
    each job computes on its own."""
    explaining = batch[0].func_name == JOB_FUNCTIONS[JobKind.EXPLAIN]
    read_input = _explain_input if explaining else _classify_input
    compute = explain_results if explaining else classify_results
    prepared: dict[str, Prepared] = {}
    members: list[Job] = []
    inputs: list[tuple[bytes, str, dict[str, Any]]] = []
    served = None
    for job in batch:
        try:
            served, data, input_format, parameters = read_input(job, job.kwargs)
        except Exception as exc:
            prepared[job.id] = Prepared(error=exc)
            continue
        members.append(job)
        inputs.append((data, input_format, parameters))
    if members:
        results = compute(served, inputs, progress=_BatchProgress(members), worker=worker)
        for job, result in zip(members, results):
            if isinstance(result, BaseException):
                prepared[job.id] = Prepared(error=result)
            else:
                prepared[job.id] = Prepared(result=result)
    return prepared


def explain(
    model: str,
    targets: list[str],
    rho: float,
    steps: int,
    layer: str | None = None,
    stability_steps: int | None = None,
    window: list[float] | None = None,
    result_ttl: int = 3600,
    stability_mode: str | None = None,
) -> dict[str, Any]:
    """Adversarial explanations for ``targets``, Grad-CAM of the predicted class and the
    stability score of the decision.

    The PNGs (input, gradcam, gradcam_overlay, one per target and its amplified difference)
    go to the hash ``images_key(job_id)``, the DICOM objects (DICOM input only) to
    ``dicom_key(job_id)``, both sealed and with ``result_ttl``; the summary is returned."""
    job = _current_job()
    _check_cancelled(job, starting=True)
    prepared = current().take_prepared(job.id)
    if prepared is not None:
        summary, files, dicom_files = prepared.unwrap()
    else:
        kwargs = {"model": model, "targets": targets, "rho": rho, "steps": steps, "layer": layer}
        kwargs |= {"stability_steps": stability_steps, "window": window, "stability_mode": stability_mode}
        served, data, input_format, parameters = _explain_input(job, kwargs)
        summary, files, dicom_files = explain_result(
            served, data, input_format, parameters, progress=_Progress(job), worker=job.worker_name
        )
    summary = _with_stage_timings(job, summary.dump())  # jobs.results.ExplainResult as the JSON rq stores
    _check_cancelled(job)
    ref = job.meta.get("pacs_reference")
    if ref and job.meta.get("store", True):
        # Back into the source's study, where its viewers look (deterministic UIDs: a second
        # run replaces rather than duplicates).
        summary["stored"] = store_report(current().settings.pacs, ref["pacs"], list(dicom_files.values()))
    files = seal_fields(images_key(job.id), files)
    dicom_files = seal_fields(dicom_key(job.id), dicom_files)
    with job.connection.pipeline() as pipe:
        pipe.hset(images_key(job.id), mapping=files)
        pipe.expire(images_key(job.id), result_ttl)
        if dicom_files:
            pipe.hset(dicom_key(job.id), mapping=dicom_files)
            pipe.expire(dicom_key(job.id), result_ttl)
        pipe.execute()
    _keep_cache_key(job, summary)
    return summary
