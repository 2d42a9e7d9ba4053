"""Reaping (the worker side of the rq adapter): the jobs of dead workers queued again or ended, and the queues' clean-up.

A started job whose every lease ran out (its worker died, or lost Redis longer than its lease)
is queued again while retries are left, else failed ``worker_lost`` (``cancelled`` when a
cancel was asked); the attempt token (``jobs.rqueue.lifecycle``) is incremented in the same
transaction, so the old worker, should it come back, is refused at its next write (fencing).
The reaper is rare and keeps WATCH and MULTI/EXEC; whoever holds a queue's maintenance lock
runs it (any worker's maintenance, or the API when a client polls a job whose lease ran out).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from redis import Redis
from redis.client import Pipeline
from rq.defaults import RQ_KEY_PREFIX
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.utils import current_timestamp, now, parse_composite_key, utcformat

from jobs.keys import cancel_key, upload_key
from jobs.queues import QUEUE_NAMES
from jobs.rqueue.layout import SERIALIZER
from jobs.rqueue.lifecycle import (
    ATTEMPT_FIELD,
    ENDED_FIELD,
    REAPED,
    _back_in_queue,
    _compare_and_set,
    _record_failure,
    _save_meta,
    _text,
)
from jobs.rqueue.taking import requeue_stranded

# --- reaping -------------------------------------------------------------------------------
# rq's clean-up lock is held 15 minutes when its holder dies (or loses Redis) before
# releasing it: no job of the queue would be reaped for that long. Ours expires sooner.
MAINTENANCE_LOCK_SECONDS = 60


def queue_named(conn: Redis, name: str) -> Queue:
    """rq's queue ``name`` (one of ``QUEUE_NAMES``) on ``conn``."""
    return Queue(name, connection=conn, serializer=SERIALIZER)


def queues_by_priority(conn: Redis, names: Collection[str] | None = None) -> list[Queue]:
    """Every queue (or those of ``names``) in the order a worker serves them: classify first,
    so a worker takes an explain job only when no classify job waits."""
    return [queue_named(conn, name) for name in QUEUE_NAMES.values() if names is None or name in names]


@contextmanager
def maintenance_lock(queue: Queue) -> Iterator[bool]:
    """rq's clean-up lock of ``queue`` (yields whether this process holds it), for at most
    MAINTENANCE_LOCK_SECONDS, released at the end."""
    held = bool(queue.connection.set(queue.registry_cleaning_key, 1, nx=True, ex=MAINTENANCE_LOCK_SECONDS))
    try:
        yield held
    finally:
        if held:
            queue.release_maintenance_lock()


def clean(conn: Redis, name: str, retries: int, lost_error: dict[str, str]) -> list[Reaped]:
    """The clean-up of queue ``name`` by whoever holds its lock (nothing when another process
    is cleaning it): jobs of dead workers reaped (``reap``), jobs a dead worker took but never
    claimed put back (``requeue_stranded``), rq's finished and failed registries trimmed."""
    queue = queue_named(conn, name)
    with maintenance_lock(queue) as held:
        if not held:
            return []
        reaped = reap(conn, queue, retries, lost_error)
        requeue_stranded(conn, queue)
        queue.finished_job_registry.cleanup()
        queue.failed_job_registry.cleanup()
        return reaped


def _leased(conn: Redis, registry_key: str, job_id: str) -> bool:
    """Whether some lease of ``job_id`` in the started registry has not run out."""
    live = conn.zrangebyscore(registry_key, f"({current_timestamp()}", "+inf")
    return any(_text(k).startswith(f"{job_id}:") for k in live)


@dataclass(frozen=True)
class Reaped:
    """What ``reap`` did to one job: ``requeued``, or ended (``failed`` worker_lost, or ``cancelled``)."""

    job: Job
    outcome: str


def reap(conn: Redis, queue: Queue, retries: int, lost_error: dict[str, str]) -> list[Reaped]:
    """Queue again (while ``retries`` allows and nobody cancelled it) or end each started job
    of ``queue`` whose leases have all run out; drop lease entries of jobs that are no longer
    started. Returns what it did, for the outcome counts and callbacks."""
    registry_key = queue.started_job_registry.key
    done = []
    for raw in conn.zrangebyscore(registry_key, 0, current_timestamp()):
        reaped = _reap_one(conn, queue, _text(raw), retries, lost_error)
        if reaped is not None:
            done.append(reaped)
    return done


def _reap_one(conn: Redis, queue: Queue, composite: str, retries: int, lost_error: dict[str, str]) -> Reaped | None:
    registry_key = queue.started_job_registry.key
    job_id, _execution_id = parse_composite_key(composite)
    try:
        job = Job.fetch(job_id, connection=conn, serializer=SERIALIZER)
    except Exception:  # gone (expired, deleted, lost) or not decodable: nothing to reap
        conn.zrem(registry_key, composite)
        return None
    if job.get_status(refresh=False) != JobStatus.STARTED or _leased(conn, registry_key, job_id):
        conn.zrem(registry_key, composite)  # an old lease of a job that ended or runs again
        return None
    cancelled = bool(conn.exists(cancel_key(job_id)))
    again = not cancelled and int(job.meta.get("retried") or 0) < retries
    outcome = "requeued" if again else ("cancelled" if cancelled else "failed")

    def abandoned(status: str | None, _a: int, _e: int) -> bool:
        # Checked again under WATCH: a renewal (it writes the job's hash) or another reaper in
        # between makes the transaction start over.
        return status == JobStatus.STARTED.value and not _leased(conn, registry_key, job_id)

    def write(pipe: Pipeline, attempt_no: int) -> None:
        pipe.zrem(registry_key, composite)
        pipe.delete(f"{RQ_KEY_PREFIX}:execution:{composite}")
        pipe.hset(job.key, ATTEMPT_FIELD, attempt_no + 1)  # fences the worker out, should it come back
        if again:
            _back_in_queue(pipe, job, queue)
            return
        job.meta["error"] = {"code": "job_cancelled", "message": "the job was cancelled"} if cancelled else lost_error
        job.ended_at = now()
        job.set_status(JobStatus.STOPPED if cancelled else JobStatus.FAILED, pipeline=pipe)
        pipe.hset(job.key, mapping={"ended_at": utcformat(job.ended_at), ENDED_FIELD: REAPED})
        _save_meta(pipe, job)
        pipe.delete(upload_key(job.id))
        _record_failure(pipe, job, "the worker running this job stopped renewing its lease")

    return Reaped(job, outcome) if _compare_and_set(conn, job.key, abandoned, write) else None
