"""Job views: a job as GET /v1/jobs/{id} shows it (status, queue position, progress, timings,
result with its image and DICOM URLs, callback delivery, error)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime

from redis import Redis

from jobs.callbacks import delivery_record
from jobs.queues import JobKind
from jobs.rqueue import JobRecord
from jobs.states import ApiStatus
from service.schemas import ErrorBody, JobView, Progress, Timings


def job_view(conn: Redis, job: JobRecord, position: int | None) -> JobView:
    """The view of ``job`` (as fetched); ``position``: where it waits in its queue, if queued."""
    kind = job.kind
    api_status = job.status
    url = f"/v1/jobs/{job.id}"

    position = position if api_status is ApiStatus.QUEUED else None
    progress = Progress(**job.meta["progress"]) if isinstance(job.meta.get("progress"), dict) else None

    enq, start, end = job.enqueued_at, job.started_at, job.ended_at
    if api_status is ApiStatus.QUEUED:
        start = end = None
    now = datetime.now(UTC)
    timings = Timings(
        enqueued_at=enq,
        started_at=start,
        ended_at=end,
        queued_seconds=((start or now) - enq).total_seconds() if enq else None,
        run_seconds=((end or now) - start).total_seconds() if start else None,
    )

    result = images = dicom = error = None
    if api_status is ApiStatus.FINISHED:
        result = job.result
        if isinstance(result, dict) and (kind is JobKind.EXPLAIN or "reused_from" in result):
            result = copy.deepcopy(result)  # the URLs are added to the copy, never to the record
            result.pop("reused_from", None)  # never another job's id (older results carried it)
        if isinstance(result, dict) and kind is JobKind.EXPLAIN:
            images = {}
            for name in (result.get("files") or {}).values():
                images[name] = f"{url}/images/{name}"
            for target in result.get("targets", []):
                for key in ("image", "difference"):
                    if target.get(key):
                        images[target[key]] = target[f"{key}_url"] = f"{url}/images/{target[key]}"
            if result.get("dicom_files"):
                dicom = {name: f"{url}/dicom/{name}" for name in result["dicom_files"]}
                for target in result.get("targets", []):
                    for key in ("dicom", "dicom_difference"):
                        if target.get(key):
                            target[f"{key}_url"] = f"{url}/dicom/{target[key]}"
    elif api_status is ApiStatus.FAILED:
        error = (
            ErrorBody(**job.meta["error"])
            if isinstance(job.meta.get("error"), dict)
            else ErrorBody(code="job_failed", message=(job.failure or "the job failed").strip().splitlines()[-1])
        )
    elif api_status is ApiStatus.CANCELLED:
        error = ErrorBody(code="job_cancelled", message="the job was cancelled")

    return JobView(
        id=job.id,
        url=url,
        kind=kind,
        status=api_status,
        model=job.model,
        queue_position=position,
        progress=progress,
        timings=timings,
        result=result,
        images=images,
        dicom=dicom,
        callback=delivery_record(conn, job),
        error=error,
    )
