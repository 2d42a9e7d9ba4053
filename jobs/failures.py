"""How a job that fails is recorded, which failures run it again, and the reaping of the jobs of a dead worker:
its error as {"code", "message"}, the store's refusals told apart from the job's own failures,
and the queue clean-up (``clean_queue``) that workers and the API run.

Retrying is safe because results are deterministic; only a run cut short is retried (its
worker died, or the store refused or lost it mid-run): any other failure (a bad image, a time
limit, a cancel) would end the same way again. Whether a job runs again, and how it ends, is
written by ``jobs.lifecycle`` under the job's attempt token, so it happens once whoever
notices first (the worker, another worker's maintenance, the API). The upload is deleted at
the job's final end only, in the same transaction.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

import redis.exceptions
from redis import Redis
from rq.job import Job
from rq.queue import Queue
from rq.timeouts import JobTimeoutException

from jobs import lifecycle
from jobs.callbacks import CallbackPolicy, notify_job_end
from jobs.keys import upload_key
from jobs.metrics import record_job
from jobs.queues import QUEUE_NAMES, SERIALIZER
from jobs.states import ApiStatus
from models.errors import (
    AexError,
    JobFailedError,
    JobTimeoutError,
    TransientError,
    WorkerLostError,
)

log = logging.getLogger("aex.worker")

# Redis unreachable (restarting, network): a failure of the moment, not of the job.
REDIS_OUTAGE: tuple[type[Exception], ...] = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
# The store refusing what it is asked (out of memory without eviction, a read-only replica, an
# ACL refusal, loading its data, a transaction aborted by one of these) or unreachable: a state
# of the store, not of the job or the request (the API answers 503 store_unavailable).
STORE_UNAVAILABLE: tuple[type[Exception], ...] = (
    *REDIS_OUTAGE,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.NoPermissionError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.MasterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ExecAbortError,
)

# rq's clean-up lock is held 15 minutes when its holder dies (or loses Redis) before
# releasing it: no job of the queue would be reaped for that long. Ours expires sooner.
MAINTENANCE_LOCK_SECONDS = 60


def job_kind(job: Job) -> str:
    return str(job.meta.get("kind", "unknown"))


def retried(job: Job) -> int:
    """How many times the job was queued again after a run cut short."""
    return int(job.meta.get("retried") or 0)


def cut_short(exc_type) -> bool:
    """Whether a run ended by something outside the job: the store refused or lost it."""
    return exc_type is not None and issubclass(exc_type, STORE_UNAVAILABLE)


def redacted_traceback(exc_type, exc_value, tb) -> str:
    """The traceback of a failed job as logs and Redis may keep it: every frame (file, line,
    code), each exception's class, and the message only of aex's own errors (written to name
    attributes, never their values). Any other exception's text may quote the input (a DICOM
    attribute holding patient data), so it is withheld."""
    out: list[str] = []
    for cls, value, frames in _chain(exc_type, exc_value, tb):
        out.append("Traceback (most recent call last):")
        out.extend(line.rstrip("\n") for line in traceback.format_list(frames))
        shown = value.message if isinstance(value, AexError) else "(message withheld: it may quote the input)"
        out.append(f"{cls.__module__}.{cls.__qualname__}: {shown}")
    return "\n".join(out)


def _chain(exc_type, exc_value, tb):
    """(class, value, frames) of an exception and the ones it was raised from, oldest first."""
    chain, seen = [], set()
    value = exc_value
    while value is not None and id(value) not in seen:
        seen.add(id(value))
        chain.append((type(value), value, traceback.extract_tb(value.__traceback__)))
        value = value.__cause__ or (None if value.__suppress_context__ else value.__context__)
    if not chain and exc_type is not None:
        chain.append((exc_type, None, traceback.extract_tb(tb)))
    return list(reversed(chain))


def error_of(exc_type, exc_value) -> dict[str, str]:
    """{"code", "message"} for the exception that ended a job, as the API reports it."""
    if isinstance(exc_value, AexError):
        return {"code": exc_value.code, "message": exc_value.message}
    if exc_type is not None and issubclass(exc_type, JobTimeoutException):
        return {"code": JobTimeoutError.code, "message": f"the job ran past its time limit ({exc_value})"}
    if exc_type is not None and issubclass(exc_type, STORE_UNAVAILABLE):
        return {
            "code": TransientError.code,
            "message": f"the job store (Redis) refused or was unreachable ({exc_type.__name__}); submit it again",
        }
    name = exc_type.__name__ if exc_type is not None else "Error"
    # Not ours: its text may quote the input (patient data); the class is enough to report.
    return {
        "code": JobFailedError.code,
        "message": f"the job failed with an unexpected {name}; the worker's log has its traceback",
    }


def discard_upload(conn: Redis, job_id: str) -> None:
    """Delete a job's upload: at its final end, never while it may run again."""
    conn.delete(upload_key(job_id))


LOST = {
    "code": WorkerLostError.code,
    "message": "the worker running this job stopped (killed, out of memory or lost), "
    "as many times as AEX_JOB_RETRIES allows; submit it again",
}


@contextmanager
def maintenance_lock(queue: Queue) -> Iterator[bool]:
    """rq's clean-up lock of ``queue`` (yields whether this process holds it), for at most
    MAINTENANCE_LOCK_SECONDS (rq holds it 15 minutes when its holder dies), released at the end."""
    held = bool(queue.connection.set(queue.registry_cleaning_key, 1, nx=True, ex=MAINTENANCE_LOCK_SECONDS))
    try:
        yield held
    finally:
        if held:
            queue.release_maintenance_lock()


def clean_queue(conn: Redis, queue: Queue, retries: int, policy: CallbackPolicy | None = None) -> None:
    """The clean-up of one queue, by whoever holds its lock: jobs of dead workers reaped
    (queued again or failed ``worker_lost``, each with its outcome counted and, at its end,
    its callback), jobs a dead worker took but never claimed put back, and rq's finished
    and failed registries trimmed."""
    with maintenance_lock(queue) as held:
        if not held:
            return  # someone is cleaning right now
        for reaped in lifecycle.reap(conn, queue, retries, LOST):
            kind = job_kind(reaped.job)
            if reaped.outcome == "requeued":
                record_job(conn, kind, "retried", None)
                log.warning("job %s: its worker stopped renewing its lease; queued again", reaped.job.id)
                continue
            record_job(conn, kind, "abandoned" if reaped.outcome == "failed" else "cancelled", None)
            status = ApiStatus.FAILED if reaped.outcome == "failed" else ApiStatus.CANCELLED
            notify_job_end(conn, reaped.job, status, policy=policy)
        lifecycle.requeue_stranded(conn, queue)
        queue.finished_job_registry.cleanup()
        queue.failed_job_registry.cleanup()


def reap_abandoned(conn: Redis, retries: int, policy: CallbackPolicy | None = None) -> None:
    """``clean_queue`` of every queue: the API runs it when a client polls a running job, so a
    job never stays "running" after the last worker died."""
    for name in QUEUE_NAMES.values():
        clean_queue(conn, Queue(name, connection=conn, serializer=SERIALIZER), retries, policy)
