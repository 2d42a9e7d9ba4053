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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import NoScriptError, ResponseError
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus, parse_job_id
from rq.queue import Queue
from rq.results import Result
from rq.utils import current_timestamp, utcparse

from jobs.queues import QUEUE_NAMES, JobKind

# Re-exported: the API enqueues and reserves places through this package.
from jobs.rqueue.enqueueing import Condition as Condition
from jobs.rqueue.enqueueing import Moved as Moved
from jobs.rqueue.enqueueing import Share as Share
from jobs.rqueue.enqueueing import absent as absent
from jobs.rqueue.enqueueing import enqueue as enqueue
from jobs.rqueue.enqueueing import holding as holding
from jobs.rqueue.enqueueing import rq_queue
from jobs.rqueue.enqueueing import shorter_than as shorter_than
from jobs.rqueue.enqueueing import within_share as within_share
from jobs.rqueue.layout import SERIALIZER, STATUS_FROM_RQ, restore_job
from jobs.scripts import RUN_REPLACING, UTC_NOW, Script, recorded, refusal
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


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def kind_of_meta(meta: Mapping[str, Any]) -> JobKind | None:
    """The kind a job's meta names (None for a job that is not one of aex's)."""
    value = meta.get("kind")
    return JobKind(value) if value in {k.value for k in JobKind} else None


def _utc(dt: datetime | None) -> datetime | None:
    return None if dt is None else (dt if dt.tzinfo else dt.replace(tzinfo=UTC))


def _ours(origin: str | None) -> bool:
    return origin in QUEUE_NAMES.values()


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
    """The queued job ``job_id`` as a record (None when Redis has no such job): its hash and
    its latest result in one round trip."""
    with conn.pipeline(transaction=False) as pipe:
        job = _fetching(conn, pipe, job_id)
        return _fetched(job, *pipe.execute())


def _fetching(conn: Redis, pipe, job_id: str) -> Job:
    """Queue on ``pipe`` (of ``conn``) the reads of ``fetch_job``: the job's hash, its latest result."""
    job = Job(parse_job_id(job_id), connection=conn, serializer=SERIALIZER)
    pipe.hgetall(job.key)
    pipe.xrevrange(Result.get_key(job.id), "+", "-", count=1)
    return job


def _fetched(job: Job, data: dict, latest: list) -> JobRecord | None:
    """The record of ``job`` from the replies of its ``_fetching`` reads."""
    if not data:
        return None
    restore_job(job, data)
    if latest:
        result_id, payload = latest[0]
        job._cached_result = Result.restore(
            job.id, _text(result_id), payload, connection=job.connection, serializer=SERIALIZER
        )
    return _record(job)


def job_statuses(conn: Redis, job_ids: list[str]) -> list[ApiStatus | None]:
    """The status of each job of ``job_ids`` (None for one Redis does not have), in one round trip."""
    jobs = Job.fetch_many(job_ids, connection=conn, serializer=SERIALIZER) if job_ids else []
    return [None if j is None else STATUS_FROM_RQ.get(j.get_status(refresh=False), ApiStatus.QUEUED) for j in jobs]


def queue_position(conn: Redis, record: JobRecord) -> int | None:
    """Where a queued job is in its queue (0 = next; None when it is in none of aex's)."""
    if not _ours(record.origin):
        return None
    return conn.lpos(rq_queue(conn, record.origin).key, record.id)  # rq's own get_job_position, without its INFO


def queue_key(lane: JobKind) -> str:
    """The list of the queue of ``lane`` (its length is how many jobs wait on it)."""
    return Queue.redis_queue_namespace_prefix + QUEUE_NAMES[lane]


def queue_depth(conn: Redis, lane: JobKind) -> int:
    """How many jobs wait on the queue of ``lane``."""
    return rq_queue(conn, QUEUE_NAMES[lane]).count


# Ids at the head of a queue looked at for its oldest waiting job (an id whose job expired
# meanwhile is skipped).
OLDEST_LOOKAHEAD = 10


def running_count(conn: Redis, lane: JobKind) -> int:
    """How many jobs of the queue of ``lane`` run now: the leases of its started registry that
    have not run out (one per claimed attempt, batch mates included; a dead worker's stop
    counting when they run out, before the reaper has seen them)."""
    key = rq_queue(conn, QUEUE_NAMES[lane]).started_job_registry.key
    return int(conn.zcount(key, f"({current_timestamp()}", "+inf"))


def oldest_wait_seconds(conn: Redis, lane: JobKind) -> float:
    """Seconds since the job at the head of the queue of ``lane`` (the next one taken, the
    longest waiting) was submitted; 0.0 when none waits. A job queued again after a cut-short
    run keeps its first submission time."""
    ids = [i.decode() for i in conn.lrange(rq_queue(conn, QUEUE_NAMES[lane]).key, 0, OLDEST_LOOKAHEAD - 1)]
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
    key = rq_queue(conn, record.origin).started_job_registry.key
    ends = [
        score for entry, score in conn.zrange(key, 0, -1, withscores=True) if parse_job_id(entry.decode()) == record.id
    ]
    return bool(ends) and max(ends) <= current_timestamp()


def cancel_queued(conn: Redis, record: JobRecord) -> bool:
    """Take a job out of its queue and cancel it; True only when this call took it out.
    LREM is atomic with a worker's dequeue: either the id was still in the queue (no worker
    has it, nor ever will: it is cancelled here) or a worker has it (False: the caller stops
    it with its flag and ``stop_running``)."""
    if not _ours(record.origin) or not conn.lrem(rq_queue(conn, record.origin).key, 0, record.id):
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


# A stand-in in the writes of ``wait_for_end``'s ``when_finished``: each becomes the time of
# Redis's clock when they are made (letters and digits only: nothing special to Lua's gsub).
CLOCK_STAND_IN = "aexstoreclock0"

# KEYS[1]: a job's hash. ARGV[1]: rq's status of a finished job, ARGV[2]: the clock's stand-in,
# then commands (``RUN``'s encoding). When the job has finished: runs them, the stand-in in
# any of their arguments replaced by the time of Redis's clock (ISO 8601, UTC, milliseconds:
# 2026-12-06T09:26:05.123+00:00), and returns the first one's reply; else false.
IF_FINISHED = Script(
    UTC_NOW
    + RUN_REPLACING
    + """
if redis.call('HGET', KEYS[1], 'status') ~= ARGV[1] then return false end
local y, mo, d, h, mi, s, us = utc_now()
local now = string.format('%04d-%02d-%02dT%02d:%02d:%02d.%03d+00:00', y, mo, d, h, mi, s, math.floor(us / 1000))
return run_replacing(ARGV, 3, #ARGV, {{ARGV[2], now}})
"""
)


def wait_for_end(
    conn: Redis, job_id: str, seconds: float, when_finished: Callable[[Pipeline], None] | None = None
) -> tuple[JobRecord | None, Any]:
    """Block until job ``job_id`` has ended (succeeded, failed or stopped), at most ``seconds``;
    then its record as ``fetch_job`` reads it, ended or not (None when Redis has no such job).
    One round trip: the reads are pipelined behind the blocking XREAD, and Redis runs them
    once it returns.

    ``when_finished``: writes to make in the same round trip, right after the reads, only if
    the job has finished by then (``fill(pipe)`` adds them to a pipeline that is never sent,
    ``jobs.scripts.recorded``; ``CLOCK_STAND_IN`` in an argument becomes the time they are
    made). Returns (the record, the first write's reply; None when the job had not finished
    and nothing was written)."""
    guarded = recorded(conn, when_finished) if when_finished is not None else None
    with conn.pipeline(transaction=False) as pipe:
        if seconds > 0:
            pipe.xread({Result.get_key(job_id): "0-0"}, block=max(1, int(seconds * 1000)))
        job = _fetching(conn, pipe, job_id)
        args = [JobStatus.FINISHED.value, CLOCK_STAND_IN, *(guarded or [])]
        if guarded is not None:
            pipe.evalsha(IF_FINISHED.sha, 1, job.key, *args)
        replies = pipe.execute(raise_on_error=False)
    for reply in replies[:-1] if guarded is not None else replies:
        if isinstance(reply, Exception):
            raise reply
    if guarded is None:
        return _fetched(job, *replies[-2:]), None
    data, latest, written = replies[-3:]
    if isinstance(written, NoScriptError):  # Redis restarted or was flushed: loaded, then run
        written = IF_FINISHED(conn, [job.key], args)
    elif isinstance(written, ResponseError):
        raise refusal(written)
    return _fetched(job, data, latest), written


def result_ttl_left(conn: Redis, job_id: str) -> int:
    """Seconds a finished job's result is still kept (negative when it is not)."""
    return int(conn.ttl(Result.get_key(job_id)))


# --- worker side: starting, leasing, ending and reaping jobs ---------------------------------
