"""Result reuse: a request whose input, checkpoint and parameters match a finished result that
is still kept, within the requester's reuse scope, is answered by a new job, finished at once
with a copy of that result.

The index is per reuse scope (``scoped_result_index_key``: the principal, or its OIDC tenant),
so one client's upload is never answered from another's job, and whether someone else
submitted the same scan cannot be learnt. The new job belongs to the requester; the job whose
result it copies (``result_job`` in its meta, for its images and DICOM objects) is never named
in what a client sees: result, view or callback.

The new job is aex's own record, no rq job: the hash ``reused_job_key(id)`` (kind, model, the
requester's meta with ``cache_key`` and ``result_job``, when it was answered, the result JSON
with ``reused: true``), kept as long as the result it copies is (its images too, for an
explain job), so it expires with them. ``fetch_reused`` reads it back as a finished
``jobs.rqueue.JobRecord``.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from redis import Redis

from jobs.callbacks import CallbackPolicy, notify_job_end
from jobs.epoch import new_job_id
from jobs.keys import images_key, reused_job_key, scoped_result_index_key
from jobs.metrics import record_job
from jobs.queues import JobKind
from jobs.rqueue import JobRecord, fetch_job, kind_of_meta, result_ttl_left
from jobs.settings import Settings
from jobs.states import ApiStatus

log = logging.getLogger("aex.service")

# A reused result must outlive the answer by at least this long to be worth reusing.
MIN_REUSE_TTL_SECONDS = 5


def reuse_result(
    conn: Redis,
    settings: Settings,
    kind: JobKind,
    model: str,
    key: str,
    meta: dict[str, Any],
    scope: str,
    policy: CallbackPolicy | None = None,
    source_id: bytes | None | object = ...,
    first: list[list[str]] | None = None,
) -> str | None:
    """When a finished result for ``key`` is still kept within reuse scope ``scope``, the id
    of a new job (its meta: ``meta``, the requester's owner included) that is finished at once
    with a copy of it (``reused: true``) and shares its images; else None. ``source_id``: what
    ``reuse_index_key(scope, key)`` held, read with other things (read here when not given);
    ``first``: commands written first in the same transaction as the new job (the request's
    pending audit record)."""
    if not settings.reuse_results:
        return None
    if source_id is ...:
        source_id = conn.get(reuse_index_key(scope, key))
    if not source_id:
        return None
    source = fetch_job(conn, source_id.decode())
    if source is None or source.status is not ApiStatus.FINISHED or not isinstance(source.result, dict):
        return None
    ttl = result_ttl_left(conn, source.id)
    if kind is JobKind.EXPLAIN:
        ttl = min(ttl, conn.ttl(images_key(source.id)))
    if ttl < MIN_REUSE_TTL_SECONDS:
        return None
    job_id = new_job_id(conn)
    now = datetime.now(UTC)
    record = JobRecord(
        id=job_id,
        kind=kind,
        status=ApiStatus.FINISHED,
        meta={
            "kind": kind.value,
            "model": model,
            **meta,
            "cache_key": key,
            "result_job": source.meta.get("result_job", source.id),
        },
        model=model,
        enqueued_at=now,
        started_at=now,
        ended_at=now,
        result={**{k: v for k, v in source.result.items() if k != "reused_from"}, "reused": True},
    )
    with conn.pipeline() as pipe:  # MULTI: the record appears whole, with its TTL
        for command in first or ():
            pipe.execute_command(*command)
        pipe.hset(
            reused_job_key(job_id),
            mapping={
                "kind": kind.value,
                "model": model,
                "meta": json.dumps(record.meta),
                "at": now.isoformat(),
                "result": json.dumps(record.result),
            },
        )
        pipe.expire(reused_job_key(job_id), ttl)
        pipe.execute()
    record_job(conn, kind.value, "reused", None)
    notify_job_end(conn, record, ApiStatus.FINISHED, policy=policy)
    log.info("job %s answered from the result of job %s", job_id, source.id)
    return job_id


def reuse_index_key(scope: str, key: str) -> str:
    """Where the result of cache key ``key`` within reuse scope ``scope`` is indexed."""
    return scoped_result_index_key(scope, key)


def fetch_reused(conn: Redis, job_id: str) -> JobRecord | None:
    """The job ``job_id`` answered from an earlier result, as a finished record (None when
    there is no such record, or it expired with the result it copied)."""
    raw = {k.decode(): v.decode() for k, v in conn.hgetall(reused_job_key(job_id)).items()}
    if not {"meta", "at", "result"} <= raw.keys():
        return None
    meta = json.loads(raw["meta"])
    at = datetime.fromisoformat(raw["at"])
    return JobRecord(
        id=job_id,
        kind=kind_of_meta(meta),
        status=ApiStatus.FINISHED,
        meta=meta,
        model=meta.get("model"),
        enqueued_at=at,
        started_at=at,
        ended_at=at,
        result=json.loads(raw["result"]),
    )
