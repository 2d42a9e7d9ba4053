"""How a job that fails is recorded, which failures run it again, and the reaping of the jobs of a dead worker:
its error as {"code", "message"}, the store's refusals told apart from the job's own failures,
and the queue clean-up (``clean_queue``) that workers and the API run.

Retrying is safe because results are deterministic; only a run cut short is retried (its
worker died, or the store refused or lost it mid-run): any other failure (a bad image, a time
limit, a cancel) would end the same way again. Whether a job runs again, and how it ends, is
written by ``jobs.rqueue.lifecycle`` under the job's attempt token, so it happens once whoever
notices first (the worker, another worker's maintenance, the API). The upload is deleted at
the job's final end only, in the same transaction.
"""

from __future__ import annotations

import logging
import traceback
from typing import TYPE_CHECKING

from redis import Redis

from jobs.callbacks import CallbackPolicy, notify_job_end
from jobs.keys import upload_key
from jobs.metrics import record_job
from jobs.queues import QUEUE_NAMES, STORE_UNAVAILABLE
from jobs.rqueue import reaping
from jobs.rqueue.layout import TIME_LIMIT_EXCEEDED
from jobs.states import ApiStatus
from models.errors import (
    AexError,
    JobFailedError,
    JobTimeoutError,
    TransientError,
    WorkerLostError,
)

if TYPE_CHECKING:
    from rq.job import Job

log = logging.getLogger("aex.worker")


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
    if exc_type is not None and issubclass(exc_type, TIME_LIMIT_EXCEEDED):
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


def clean_queue(conn: Redis, name: str, retries: int, policy: CallbackPolicy | None = None) -> None:
    """The clean-up of the queue ``name`` (``jobs.rqueue.reaping.clean``, by whoever holds
    its lock), then what follows each job it reaped: the outcome counted and, at its end, its
    callback."""
    for reaped in reaping.clean(conn, name, retries, LOST):
        kind = job_kind(reaped.job)
        if reaped.outcome == "requeued":
            record_job(conn, kind, "retried", None)
            log.warning("job %s: its worker stopped renewing its lease; queued again", reaped.job.id)
            continue
        record_job(conn, kind, "abandoned" if reaped.outcome == "failed" else "cancelled", None)
        status = ApiStatus.FAILED if reaped.outcome == "failed" else ApiStatus.CANCELLED
        notify_job_end(conn, reaped.job, status, policy=policy)


def reap_abandoned(conn: Redis, retries: int, policy: CallbackPolicy | None = None) -> None:
    """``clean_queue`` of every queue: the API runs it when a client polls a running job, so a
    job never stays "running" after the last worker died."""
    for name in QUEUE_NAMES.values():
        clean_queue(conn, name, retries, policy)
