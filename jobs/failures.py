"""How a job that fails is recorded, and which failures run it again: its error as {"code",
"message"} in job.meta, the outcome counted, a run cut short from outside (its worker died or
lost Redis) queued again while AEX_JOB_RETRIES allows, and the jobs of a dead worker reaped
(rq's StartedJobRegistry clean-up).

Retrying is safe because results are deterministic; only a run cut short is retried: any
other failure (a bad image, a time limit, a cancel) would end the same way again. The retry
itself is rq's: the exception handler gives the job one retry in memory, and rq's failure
handling (the worker's, or the registry clean-up's) then queues it again instead of failing
it. The upload is deleted at the job's final end only.
"""

from __future__ import annotations

import functools
import logging
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import redis.exceptions
from redis import Redis
from rq.exceptions import AbandonedJobError
from rq.job import Job
from rq.queue import Queue
from rq.timeouts import JobTimeoutException

from jobs.callbacks import CallbackPolicy, notify_job_end
from jobs.keys import cancel_key, upload_key
from jobs.metrics import record_job
from jobs.queues import QUEUE_NAMES, SERIALIZER
from jobs.states import ApiStatus
from models.errors import (
    AexError,
    JobCancelledError,
    JobFailedError,
    JobTimeoutError,
    TransientError,
    WorkerLostError,
)

log = logging.getLogger("aex.worker")

# Redis unreachable (restarting, network): a failure of the moment, not of the job.
REDIS_OUTAGE: tuple[type[Exception], ...] = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

# rq's clean-up lock is held 15 minutes when its holder dies (or loses Redis) before
# releasing it: no job of the queue would be reaped for that long. Ours expires sooner.
MAINTENANCE_LOCK_SECONDS = 60


def job_kind(job: Job) -> str:
    return str(job.meta.get("kind", "unknown"))


def retried(job: Job) -> int:
    """How many times the job was queued again after a run cut short."""
    return int(job.meta.get("retried") or 0)


def cut_short(exc_type) -> bool:
    """Whether a run ended by something outside the job: its worker died (rq's
    AbandonedJobError) or lost Redis."""
    return exc_type is not None and issubclass(exc_type, (AbandonedJobError, *REDIS_OUTAGE))


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
    if exc_type is not None and issubclass(exc_type, AbandonedJobError):
        return {
            "code": WorkerLostError.code,
            "message": "the worker running this job stopped (killed, out of memory or lost), "
            "as many times as AEX_JOB_RETRIES allows; submit it again",
        }
    if exc_type is not None and issubclass(exc_type, REDIS_OUTAGE):
        return {"code": TransientError.code, "message": f"the job store (Redis) was unreachable: {exc_value}"}
    name = exc_type.__name__ if exc_type is not None else "Error"
    # Not ours: its text may quote the input (patient data); the class is enough to report.
    return {
        "code": JobFailedError.code,
        "message": f"the job failed with an unexpected {name}; the worker's log has its traceback",
    }


def discard_upload(conn: Redis, job_id: str) -> None:
    """Delete a job's upload: at its final end, never while it may run again."""
    conn.delete(upload_key(job_id))


def _retry(job: Job, exc_type, retries: int) -> bool:
    """Give a run cut short one more run (rq queues it again, at the front: it was accepted
    before what waits behind it) while retries are left and nobody cancelled it."""
    if not cut_short(exc_type) or retried(job) >= retries or job.connection.exists(cancel_key(job.id)):
        return False
    job.meta["retried"] = retried(job) + 1
    job.meta.pop("progress", None)  # the view would show the cut run's progress while queued
    job.meta.pop("error", None)
    job.retries_left = 1  # in memory only: rq's retry stores 0, so no other failure retries it
    job.enqueue_at_front_on_retry = True
    record_job(job.connection, job_kind(job), "retried", None)
    log.warning(
        "job %s: run cut short (%s); queued again, retry %d of %d",
        job.id,
        exc_type.__name__,
        retried(job),
        retries,
    )
    return True


def record_job_error(job: Job, exc_type, exc_value, tb, retries: int = 0, policy: CallbackPolicy | None = None) -> bool:
    """rq exception handler (worker failures and the clean-up of abandoned jobs alike): queue
    a run cut short again while ``retries`` allows; else keep {"code", "message"} in
    job.meta["error"] and count the outcome. Returns True so rq's other handlers (its log)
    still run. ``policy``: how the callback of an abandoned job is sent (signed, pinned)."""
    if _retry(job, exc_type, retries):
        return True
    if isinstance(exc_value, JobCancelledError):
        outcome = "cancelled"
    elif exc_type is not None and issubclass(exc_type, AbandonedJobError):
        outcome = "abandoned"
    else:
        outcome = "failed"
    job.meta["error"] = error_of(exc_type, exc_value)
    job.save_meta()
    record_job(job.connection, job_kind(job), outcome, None)
    if outcome == "abandoned":
        # Its final end, and nobody else will see it: its worker is gone.
        discard_upload(job.connection, job.id)
        notify_job_end(job.connection, job, ApiStatus.FAILED, policy=policy)
    return True


def job_error_handler(retries: int, policy: CallbackPolicy | None = None) -> Callable[..., bool]:
    """``record_job_error`` with the retry budget and the callback policy, as rq calls an
    exception handler."""
    return functools.partial(record_job_error, retries=retries, policy=policy)


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


def reap_abandoned(conn: Redis, retries: int, policy: CallbackPolicy | None = None) -> None:
    """Queue again, or fail, the jobs whose worker stopped renewing its lease (rq's
    StartedJobRegistry clean-up). Workers do this in their maintenance; the API also does it
    when a client polls a running job, so a job never stays "running" after the last worker
    died."""
    handler = job_error_handler(retries, policy)
    for name in QUEUE_NAMES.values():
        queue = Queue(name, connection=conn, serializer=SERIALIZER)
        with maintenance_lock(queue) as held:
            if held:  # else a worker is cleaning right now
                queue.started_job_registry.cleanup(exception_handlers=[handler])
