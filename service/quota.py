"""Fairness: at most AEX_MAX_JOBS_PER_PRINCIPAL queued or running jobs per principal, so one client cannot fill the queue for everyone.

Each principal has a sorted set of the ids of its jobs that may still be waiting or running
(``principal_jobs_key``; the score is when the id was reserved): its share (``share_of``). A
job is enqueued with its place in one atomic step (``jobs.rqueue.enqueue(share=...)``: counted,
then added only when a place is free), so two requests racing for the last place cannot both
get it; ids of jobs that ended or expired are pruned while counting (an id reserved moments
ago whose job is not in Redis still counts). Torch-free.
"""

from __future__ import annotations

import time

from redis import Redis

from jobs.keys import principal_jobs_key
from jobs.rqueue import Share, job_statuses, within_share
from jobs.states import ApiStatus
from models.errors import TooManyJobsError
from service.auth.principal import Principal, owner_digest

ACTIVE = frozenset({ApiStatus.QUEUED, ApiStatus.RUNNING})
# An id reserved this recently counts even before its job exists (it is being enqueued).
RESERVATION_SECONDS = 30.0


def active_jobs(conn: Redis, principal: Principal, keep: str | None = None) -> list[str]:
    """Ids of the principal's jobs still queued or running (``keep``: an id reserved for a
    job not enqueued yet, counted as active). Ended or expired ones are dropped from the set."""
    key = principal_jobs_key(owner_digest(principal))
    now = time.time()
    entries = [(i.decode() if isinstance(i, bytes) else str(i), s) for i, s in conn.zrange(key, 0, -1, withscores=True)]
    entries = [(i, s) for i, s in entries if i != keep]
    statuses = job_statuses(conn, [i for i, _ in entries])
    active, ended = [], []
    for (job_id, reserved_at), status in zip(entries, statuses):
        if status is None:
            pending = now - reserved_at < RESERVATION_SECONDS
        else:
            pending = status in ACTIVE
        (active if pending else ended).append(job_id)
    if ended:
        conn.zrem(key, *ended)
    return active + ([keep] if keep else [])


def share_of(principal: Principal, limit: int, ttl: int) -> Share:
    """The principal's share of the queues (``jobs.rqueue.Share``): at most ``limit`` jobs;
    ``ttl``: how long the set may outlive its last job (the longest a job can wait and run)."""
    return Share(principal_jobs_key(owner_digest(principal)), limit, ttl, RESERVATION_SECONDS)


def too_many(limit: int) -> TooManyJobsError:
    return TooManyJobsError(
        f"you have {limit} jobs queued or running (AEX_MAX_JOBS_PER_PRINCIPAL): wait for one to end, or cancel one"
    )


def reserve(conn: Redis, principal: Principal, job_id: str, limit: int, ttl: int) -> None:
    """Count ``job_id`` among the principal's jobs, or raise TooManyJobsError (429) when it
    would make more than ``limit``. ``ttl``: how long the set may outlive its last job (the
    longest a job can wait and run). (A job is enqueued with its place in one step:
    ``jobs.rqueue.enqueue(share=...)``.)"""
    if not within_share(conn, share_of(principal, limit, ttl), job_id, []):
        raise too_many(limit)


def release(conn: Redis, principal: Principal, job_id: str) -> None:
    """Forget a reserved id whose job was not enqueued after all."""
    conn.zrem(principal_jobs_key(owner_digest(principal)), job_id)
