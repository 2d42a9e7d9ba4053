"""The one adapter over rq: every use of rq beyond its public API (its Redis layout, its registries, its job
life) is here, so the API, the CLI and the workers see aex's job records and never rq's internals.

``tests/jobs/test_rqueue.py`` pins the rq behaviour relied on here (rq 3.0, constraints.txt)."""

from __future__ import annotations

# --- API side (service, CLI): enqueue, read, cancel, wait, reuse ----------------------------
# The API and the CLI never import rq: they enqueue, read (as a ``JobRecord``), count, cancel
# and wait for jobs through these functions. rq's layout relied on: a queue is the list
# ``rq:queue:<name>`` (enqueue appends the id; a worker pops it: LREM and that pop are atomic
# with each other); a job's status, meta and times are its hash ``rq:job:<id>``; each end
# (success, failure, stop) appends to its stream ``rq:results:<id>``; a started job has a
# lease, its score in ``rq:wip:<queue>``.
import contextlib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from redis import Redis
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, parse_job_id
from rq.queue import Queue
from rq.results import Result
from rq.utils import current_timestamp, utcparse

from jobs.queues import JOB_FUNCTIONS, QUEUE_NAMES, JobKind
from jobs.rqueue.layout import SERIALIZER, STATUS_FROM_RQ
from jobs.rqueue.taking import wake
from jobs.states import ApiStatus


@dataclass(frozen=True)
class JobRecord:
    """A job as the API reads it, torch-free and rq-free: ``status`` as the API shows it,
    ``meta`` as submitted (owner, callback, progress, error, ...), times in UTC, ``result``
    the return value of a finished job, ``failure`` the failure text of a failed one (its
    last line is shown when ``meta`` has no error), ``origin`` the queue it was put on (None
    for a job that is on none, such as a reused result)."""

    id: str
    kind: JobKind | None
    status: ApiStatus
    meta: Mapping[str, Any]
    model: str | None = None
    enqueued_at: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    result: Any = None
    failure: str | None = None
    origin: str | None = None


def kind_of_meta(meta: Mapping[str, Any]) -> JobKind | None:
    """The kind a job's meta names (None for a job that is not one of aex's)."""
    value = meta.get("kind")
    return JobKind(value) if value in {k.value for k in JobKind} else None


def _utc(dt: datetime | None) -> datetime | None:
    return None if dt is None else (dt if dt.tzinfo else dt.replace(tzinfo=UTC))


def _queue(conn: Redis, name: str) -> Queue:
    return Queue(name, connection=conn, serializer=SERIALIZER)


def _ours(origin: str | None) -> bool:
    return origin in QUEUE_NAMES.values()


def enqueue(
    conn: Redis,
    lane: JobKind,
    kind: JobKind,
    job_id: str,
    kwargs: dict[str, Any],
    meta: dict[str, Any],
    timeout: int,
    result_ttl: int,
    wait_ttl: int,
    description: str,
) -> None:
    """Put job ``job_id`` of ``kind`` (its function by dotted path) at the tail of the queue
    of ``lane``; it waits at most ``wait_ttl`` seconds, runs at most ``timeout``, and its
    result (or failure) is kept ``result_ttl``."""
    _queue(conn, QUEUE_NAMES[lane]).enqueue(
        JOB_FUNCTIONS[kind],
        kwargs=kwargs,
        job_id=job_id,
        job_timeout=timeout,
        result_ttl=result_ttl,
        failure_ttl=result_ttl,
        ttl=wait_ttl,
        meta=meta,
        description=description,
    )
    with conn.pipeline(transaction=False) as pipe:
        wake(pipe)  # an idle worker takes it now, not at its next look
        pipe.execute()


def _record(job: Job) -> JobRecord:
    status = STATUS_FROM_RQ.get(job.get_status(refresh=False), ApiStatus.QUEUED)
    result = failure = None
    if status is ApiStatus.FINISHED:
        result = job.return_value()
    elif status is ApiStatus.FAILED:
        with warnings.catch_warnings():  # the latest failed Result's text, else the job's own
            warnings.simplefilter("ignore", DeprecationWarning)
            failure = job.exc_info
    meta = job.meta
    return JobRecord(
        id=job.id,
        kind=kind_of_meta(meta),
        status=status,
        meta=meta,
        model=meta.get("model"),
        enqueued_at=_utc(job.enqueued_at),
        started_at=_utc(job.started_at),
        ended_at=_utc(job.ended_at),
        result=result,
        failure=failure,
        origin=job.origin,
    )


def fetch_job(conn: Redis, job_id: str) -> JobRecord | None:
    """The queued job ``job_id`` as a record (None when Redis has no such job)."""
    try:
        return _record(Job.fetch(job_id, connection=conn, serializer=SERIALIZER))
    except NoSuchJobError:
        return None


def job_statuses(conn: Redis, job_ids: list[str]) -> list[ApiStatus | None]:
    """The status of each job of ``job_ids`` (None for one Redis does not have), in one round trip."""
    jobs = Job.fetch_many(job_ids, connection=conn, serializer=SERIALIZER) if job_ids else []
    return [None if j is None else STATUS_FROM_RQ.get(j.get_status(refresh=False), ApiStatus.QUEUED) for j in jobs]


def queue_position(conn: Redis, record: JobRecord) -> int | None:
    """Where a queued job is in its queue (0 = next; None when it is in none of aex's)."""
    if not _ours(record.origin):
        return None
    return conn.lpos(_queue(conn, record.origin).key, record.id)  # rq's own get_job_position, without its INFO


def queue_depth(conn: Redis, lane: JobKind) -> int:
    """How many jobs wait on the queue of ``lane``."""
    return _queue(conn, QUEUE_NAMES[lane]).count


# Ids at the head of a queue looked at for its oldest waiting job (an id whose job expired
# meanwhile is skipped).
OLDEST_LOOKAHEAD = 10


def running_count(conn: Redis, lane: JobKind) -> int:
    """How many jobs of the queue of ``lane`` run now: the leases of its started registry that
    have not run out (one per claimed attempt, batch mates included; a dead worker's stop
    counting when they run out, before the reaper has seen them)."""
    key = _queue(conn, QUEUE_NAMES[lane]).started_job_registry.key
    return int(conn.zcount(key, f"({current_timestamp()}", "+inf"))


def oldest_wait_seconds(conn: Redis, lane: JobKind) -> float:
    """Seconds since the job at the head of the queue of ``lane`` (the next one taken, the
    longest waiting) was submitted; 0.0 when none waits. A job queued again after a cut-short
    run keeps its first submission time."""
    ids = [i.decode() for i in conn.lrange(_queue(conn, QUEUE_NAMES[lane]).key, 0, OLDEST_LOOKAHEAD - 1)]
    if not ids:
        return 0.0
    with conn.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.hget(Job.key_for(job_id), "enqueued_at")
        stamps = pipe.execute()
    for stamp in stamps:
        if stamp:
            return max(0.0, (datetime.now(UTC) - _utc(utcparse(stamp.decode()))).total_seconds())
    return 0.0


def lease_expired(conn: Redis, record: JobRecord) -> bool:
    """Whether every lease of a running job ran out (its worker died, and no clean-up has
    reaped it yet): each lease is an entry ``<id>:<execution>`` of its queue's started
    registry, scored by when it runs out (the worker side renews it, ``jobs.rqueue.lifecycle``)."""
    if record.status is not ApiStatus.RUNNING or not _ours(record.origin):
        return False
    key = _queue(conn, record.origin).started_job_registry.key
    ends = [
        score for entry, score in conn.zrange(key, 0, -1, withscores=True) if parse_job_id(entry.decode()) == record.id
    ]
    return bool(ends) and max(ends) <= current_timestamp()


def cancel_queued(conn: Redis, record: JobRecord) -> bool:
    """Take a job out of its queue and cancel it; True only when this call took it out.
    LREM is atomic with a worker's dequeue: either the id was still in the queue (no worker
    has it, nor ever will: it is cancelled here) or a worker has it (False: the caller stops
    it with its flag and ``stop_running``)."""
    if not _ours(record.origin) or not conn.lrem(_queue(conn, record.origin).key, 0, record.id):
        return False
    try:
        Job.fetch(record.id, connection=conn, serializer=SERIALIZER).cancel()
    except (InvalidJobOperation, NoSuchJobError):
        return False  # cancelled by another request meanwhile, or expired
    return True


def stop_running(conn: Redis, job_id: str) -> None:
    """Ask the worker running ``job_id`` to stop it (rq's stop-job command on the worker's
    channel); nothing when no worker runs it."""
    with contextlib.suppress(InvalidJobOperation, NoSuchJobError):
        send_stop_job_command(conn, job_id, serializer=SERIALIZER)


def wait_for_end(conn: Redis, job_id: str, seconds: float) -> None:
    """Block until job ``job_id`` has ended (succeeded, failed or stopped), at most ``seconds``."""
    if seconds > 0:
        conn.xread({Result.get_key(job_id): "0-0"}, block=max(1, int(seconds * 1000)))


def result_ttl_left(conn: Redis, job_id: str) -> int:
    """Seconds a finished job's result is still kept (negative when it is not)."""
    return int(conn.ttl(Result.get_key(job_id)))


# --- worker side: starting, leasing, ending and reaping jobs ---------------------------------
