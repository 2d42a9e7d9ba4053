"""How a job that fails is recorded: its error as {"code", "message"} in job.meta, the outcome
counted, and the jobs of a dead worker reaped (rq's StartedJobRegistry clean-up)."""

from __future__ import annotations

from redis import Redis
from rq.exceptions import AbandonedJobError
from rq.job import Job
from rq.timeouts import JobTimeoutException

from models.errors import AexError, JobCancelledError, JobFailedError, JobTimeoutError, WorkerLostError
from worker.callbacks import notify_job_end
from worker.job_metrics import record_job
from worker.queues import QUEUE_NAMES, SERIALIZER
from worker.states import ApiStatus


def job_kind(job: Job) -> str:
    return str(job.meta.get("kind", "unknown"))


def error_of(exc_type, exc_value) -> dict[str, str]:
    """{"code", "message"} for the exception that ended a job, as the API reports it."""
    if isinstance(exc_value, AexError):
        return {"code": exc_value.code, "message": exc_value.message}
    if exc_type is not None and issubclass(exc_type, JobTimeoutException):
        return {"code": JobTimeoutError.code, "message": f"the job ran past its time limit ({exc_value})"}
    if exc_type is not None and issubclass(exc_type, AbandonedJobError):
        return {
            "code": WorkerLostError.code,
            "message": "the worker running this job stopped (killed, out of memory or lost); submit it again",
        }
    name = exc_type.__name__ if exc_type is not None else "Error"
    return {"code": JobFailedError.code, "message": f"{name}: {exc_value}"}


def record_job_error(job: Job, exc_type, exc_value, tb) -> bool:
    """rq exception handler (worker failures and the clean-up of abandoned jobs alike): keep
    {"code", "message"} in job.meta["error"] and count the outcome. Returns True so rq's
    other handlers (its log) still run."""
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
        # Nobody else will see this job end: its worker is gone.

        notify_job_end(job.connection, job, ApiStatus.FAILED)
    return True


def reap_abandoned(conn: Redis) -> None:
    """Fail the jobs whose worker stopped renewing its lease (rq's StartedJobRegistry
    clean-up). Workers do this in their maintenance; the API also does it when a client
    polls a running job, so a job never stays "running" after the last worker died."""
    from rq.queue import Queue

    for name in QUEUE_NAMES.values():
        queue = Queue(name, connection=conn, serializer=SERIALIZER)
        if queue.acquire_maintenance_lock():  # else a worker is cleaning right now
            try:
                queue.started_job_registry.cleanup(exception_handlers=[record_job_error])
            finally:
                queue.release_maintenance_lock()
