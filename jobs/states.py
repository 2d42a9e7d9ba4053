"""Job states as the API shows them, and the one mapping from rq's job status to them."""

from __future__ import annotations

from enum import Enum

from rq.job import JobStatus


class ApiStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


# The one mapping from rq's job status to ours. STOPPED is a running job that was
# cancelled (rq's stop-job command); CANCELED one cancelled while it waited.
STATUS_FROM_RQ: dict[JobStatus, ApiStatus] = {
    JobStatus.CREATED: ApiStatus.QUEUED,
    JobStatus.QUEUED: ApiStatus.QUEUED,
    JobStatus.DEFERRED: ApiStatus.QUEUED,
    JobStatus.SCHEDULED: ApiStatus.QUEUED,
    JobStatus.RATE_LIMITED: ApiStatus.QUEUED,
    JobStatus.READY_TO_ENQUEUE: ApiStatus.QUEUED,
    JobStatus.STARTED: ApiStatus.RUNNING,
    JobStatus.FINISHED: ApiStatus.FINISHED,
    JobStatus.FAILED: ApiStatus.FAILED,
    JobStatus.STOPPED: ApiStatus.CANCELLED,
    JobStatus.CANCELED: ApiStatus.CANCELLED,
}


TERMINAL = frozenset({ApiStatus.FINISHED, ApiStatus.FAILED, ApiStatus.CANCELLED})
