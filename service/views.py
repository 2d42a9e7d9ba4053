"""Job views: a job as GET /v1/jobs/{id} shows it (status, queue position, progress, timings,
result with its image and DICOM URLs, callback delivery, error).

A view's result is sent as the worker stored it (``ShownJob``): the worker validated it and
checked every number finite when it stored it (``jobs.results``: ``ResultModel.dump``), and its
JSON validated and written out again is the very same JSON (tests/jobs/test_results.py). Doing
that again for every view cost the API about a millisecond of CPU per classify (a result is
some 700 values: each model's finite check, field validation, its serialiser). The view's own
small fields (status, timings, progress, error, callback) are validated as before.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

from pydantic import TypeAdapter
from pydantic.json_schema import SkipJsonSchema
from redis import Redis

from jobs.callbacks import delivery_record
from jobs.queues import JobKind
from jobs.results import JobResult
from jobs.rqueue import JobRecord
from jobs.states import ApiStatus
from service.schemas import ErrorBody, JobView, Progress, Timings

_RESULT = TypeAdapter(JobResult)


class ShownJob(JobView):
    """A job view as the API answers it: ``result`` is the result's JSON as the worker stored it
    (a dict, the URLs of an explain job's files added; None without one), passed through as it
    is. ``content()`` is the JSON value of the view, exactly what ``JobView`` writes out;
    ``typed()`` the view with its result validated (a ``JobView``)."""

    result: SkipJsonSchema[Any] = None

    def content(self) -> dict[str, Any]:
        """The view as JSON values (``JobView.model_dump(mode="json")``, fields in their order),
        its result the stored dict itself (not copied: do not change it). A NaN or an infinity
        in it, which the worker never stores, stays one: the encoder refuses it (``typed``)."""
        fields = self.model_dump(mode="json", exclude={"result"})
        return {name: self.result if name == "result" else fields[name] for name in JobView.model_fields}

    def typed(self) -> JobView:
        """The view with its result validated: raises NonFiniteResultError (naming where) for a
        result that holds a NaN or an infinity, as every result model does."""
        result = None if self.result is None else _RESULT.validate_python(self.result)
        return JobView(
            **{name: getattr(self, name) for name in JobView.model_fields if name != "result"}, result=result
        )


def job_view(conn: Redis, job: JobRecord, position: int | None) -> ShownJob:
    """The view of ``job`` (as fetched); ``position``: where it waits in its queue, if queued.
    Its result is the stored one (``ShownJob``), never changed: an explain job's URLs are added
    to a copy."""
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

    return ShownJob(
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
