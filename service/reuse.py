"""Result reuse: a request whose input, checkpoint and parameters match a finished result that
is still kept, within the requester's reuse scope, is answered by a new job, finished at once
with a copy of that result.

The index is per reuse scope (``scoped_result_index_key``: the principal, or its OIDC tenant),
so one client's upload is never answered from another's job, and whether someone else
submitted the same scan cannot be learnt. The new job belongs to the requester; the job whose
result it copies (``result_job`` in its meta, for its images and DICOM objects) is never named
in what a client sees: result, view or callback."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from redis import Redis
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.results import Result

from jobs.callbacks import CallbackPolicy, notify_job_end
from jobs.epoch import new_job_id
from jobs.keys import images_key, scoped_result_index_key
from jobs.metrics import record_job
from jobs.queues import JOB_FUNCTIONS, SERIALIZER, JobKind
from jobs.settings import Settings
from jobs.states import ApiStatus

log = logging.getLogger("aex.service")

# A reused result must outlive the answer by at least this long to be worth reusing.
MIN_REUSE_TTL_SECONDS = 5


def reuse_result(
    conn: Redis,
    queue: Queue,
    settings: Settings,
    kind: JobKind,
    model: str,
    key: str,
    kwargs: dict[str, Any],
    meta: dict[str, Any],
    scope: str,
    policy: CallbackPolicy | None = None,
) -> str | None:
    """When a finished result for ``key`` is still kept within reuse scope ``scope``, a new
    job (its meta: ``meta``, the requester's owner included) that is finished at once with a
    copy of it (``reused: true``) and shares its images; else None."""
    if not settings.reuse_results:
        return None
    source_id = conn.get(scoped_result_index_key(scope, key))
    if not source_id:
        return None
    try:
        source = Job.fetch(source_id.decode(), connection=conn, serializer=SERIALIZER)
    except NoSuchJobError:
        return None
    result = source.return_value() if source.get_status(refresh=False) == JobStatus.FINISHED else None
    ttl = conn.ttl(Result.get_key(source.id))
    if kind is JobKind.EXPLAIN:
        ttl = min(ttl, conn.ttl(images_key(source.id)))
    if not isinstance(result, dict) or ttl < MIN_REUSE_TTL_SECONDS:
        return None
    job_id = new_job_id(conn)
    now = datetime.now(UTC)
    job = Job.create(
        JOB_FUNCTIONS[kind],
        kwargs={"model": model, **kwargs},
        connection=conn,
        serializer=SERIALIZER,
        id=job_id,
        result_ttl=ttl,
        failure_ttl=ttl,
        status=JobStatus.FINISHED,
        origin=queue.name,
        description=f"{kind.value} {model} (reused)",
        meta={
            "kind": kind.value,
            "model": model,
            **meta,
            "cache_key": key,
            "result_job": source.meta.get("result_job", source.id),
        },
    )
    job.enqueued_at = job.started_at = job.ended_at = now
    with conn.pipeline() as pipe:
        job.save(pipeline=pipe)
        Result.create(
            job,
            Result.Type.SUCCESSFUL,
            ttl,
            return_value={**{k: v for k, v in result.items() if k != "reused_from"}, "reused": True},
            pipeline=pipe,
        )
        job.cleanup(ttl, pipeline=pipe, remove_from_queue=False)
        queue.finished_job_registry.add(job, ttl, pipe)
        pipe.execute()
    record_job(conn, kind.value, "reused", None)
    notify_job_end(conn, job, ApiStatus.FINISHED, policy=policy)
    log.info("job %s answered from the result of job %s", job_id, source.id)
    return job_id
