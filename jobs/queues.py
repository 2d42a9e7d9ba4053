"""The queues between the API and the workers: job kinds, queue names, the job functions by
dotted path, the Redis connection, the check that it keeps its keys (no eviction), and which
of its errors mean the store refuses or is away.

Jobs are enqueued by dotted path ("worker.tasks.classify") with small JSON-safe keyword
arguments and stored as JSON (``jobs.rqueue.layout.SERIALIZER``): nothing in Redis is ever unpickled.
Torch-free: the API imports it."""

from __future__ import annotations

from enum import Enum

import redis.exceptions
from redis import Redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError
from redis.retry import Retry

from jobs.roundtrips import counting
from models.errors import StoreMisconfiguredError


class JobKind(str, Enum):
    CLASSIFY = "classify"
    EXPLAIN = "explain"


# Queue names in the order workers serve them: classify is the high-priority queue.
QUEUE_NAMES: dict[JobKind, str] = {JobKind.CLASSIFY: "aex-classify", JobKind.EXPLAIN: "aex-explain"}


def lane_of(kind: JobKind, stability: bool = False) -> JobKind:
    """The queue a job waits on, by its cost and not by its route: a plain classify
    (milliseconds) on the high-priority classify queue; anything with a search (an explain
    job, a classify with the stability score: seconds to minutes) on the explain queue, so
    that it never holds a plain classify behind it."""
    return JobKind.CLASSIFY if kind is JobKind.CLASSIFY and not stability else JobKind.EXPLAIN


JOB_FUNCTIONS: dict[JobKind, str] = {JobKind.CLASSIFY: "worker.tasks.classify", JobKind.EXPLAIN: "worker.tasks.explain"}


def connect(url: str, socket_timeout: float | None = None, retry_seconds: int = 5) -> Redis:
    """A Redis client for ``url`` (redis://, rediss:// or unix://) that fails fast when the
    server is gone instead of hanging, and rides out a Redis restart: a command that finds
    the server unreachable is tried again, on a new connection, for about ``retry_seconds``
    (after 0.1 s, 0.2 s, 0.4 s, 0.8 s, then every second). Its round trips are counted
    (``jobs.roundtrips``)."""
    retry = Retry(
        ExponentialBackoff(cap=1.0, base=0.05),
        retries=4 + max(0, retry_seconds - 1),
        supported_errors=(ConnectionError,),
    )
    return counting(
        Redis.from_url(
            url, socket_connect_timeout=3.0, socket_timeout=socket_timeout, health_check_interval=30, retry=retry
        )
    )


def check_store_policy(conn: Redis) -> str:
    """Refuse (``StoreMisconfiguredError``) a Redis whose ``maxmemory-policy`` is not
    ``noeviction``: an evicting Redis drops keys silently when full, and jobs, API keys and
    the audit trail with them. The policy is read with ``CONFIG GET``, or from ``INFO memory``
    when the user's ACL denies CONFIG; a policy neither shows is refused too. Returns the
    policy. A Redis error other than a refusal to answer them (unreachable) is raised as is."""
    policy = None
    try:
        value = (conn.config_get("maxmemory-policy") or {}).get("maxmemory-policy")
        policy = value.decode() if isinstance(value, bytes) else value
    except redis.exceptions.ResponseError:  # NOPERM (an ACL without CONFIG), or CONFIG renamed away
        pass
    if not policy:
        try:
            value = (conn.info("memory") or {}).get("maxmemory_policy")
            policy = value.decode() if isinstance(value, bytes) else value
        except redis.exceptions.ResponseError:
            pass
    if not policy:
        raise StoreMisconfiguredError(
            "the job store's maxmemory-policy cannot be read (neither CONFIG GET maxmemory-policy nor "
            "INFO memory is allowed to this user): allow one of them (ACL: +config|get or +info), or check "
            "that the policy is noeviction; aex does not start without knowing that Redis keeps its keys"
        )
    if policy != "noeviction":
        raise StoreMisconfiguredError(
            f"the job store's maxmemory-policy is {policy!r}: when full, Redis would evict keys silently, "
            "and jobs, API keys and the audit trail with them; set maxmemory-policy noeviction "
            "(redis.conf, or CONFIG SET maxmemory-policy noeviction): a full Redis then refuses writes, "
            "which aex answers 503 store_unavailable"
        )
    return policy


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
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ExecAbortError,
)
