"""The queues between the API and the workers: job kinds, queue names, the job functions by
dotted path, the JSON serializer, the Redis connection and the live workers with their
published catalogues.

Jobs are enqueued by dotted path ("worker.tasks.classify") with small JSON-safe keyword
arguments and stored with rq's JSON serializer: nothing in Redis is ever unpickled.
Torch-free: the API imports it."""

from __future__ import annotations

import json
from enum import Enum
from typing import Any

from redis import Redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError
from redis.retry import Retry
from rq.serializers import JSONSerializer

from jobs.keys import CATALOGUE_FIELD

SERIALIZER = JSONSerializer


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


def refusal(job) -> str | None:
    """Why a worker must not run ``job`` (None: it may). Whoever can write to Redis could
    store a job naming any importable function (rq imports the dotted name it is given, and
    the names of its success/failure/stopped callbacks): only aex's own job functions run,
    and no job may name an rq callback or an rq webhook (a request rq would send, off the
    callback allow-list, with the job's result or failure). Nothing is imported to decide."""
    try:
        name = job.func_name
    except Exception:  # data that does not even decode as a job
        return "the job's data cannot be read"
    if name not in JOB_FUNCTIONS.values():
        return "it names a function that is not one of aex's job functions"
    if any(
        getattr(job, attr, None)
        for attr in ("_success_callback_name", "_failure_callback_name", "_stopped_callback_name")
    ):
        return "it names rq callbacks, which aex jobs never have"
    if getattr(job, "webhooks", None):
        return "it names rq webhooks, which aex jobs never have"
    return None


def connect(url: str, socket_timeout: float | None = None, retry_seconds: int = 5) -> Redis:
    """A Redis client for ``url`` (redis://, rediss:// or unix://) that fails fast when the
    server is gone instead of hanging, and rides out a Redis restart: a command that finds
    the server unreachable is tried again, on a new connection, for about ``retry_seconds``
    (after 0.1 s, 0.2 s, 0.4 s, 0.8 s, then every second)."""
    retry = Retry(
        ExponentialBackoff(cap=1.0, base=0.05),
        retries=4 + max(0, retry_seconds - 1),
        supported_errors=(ConnectionError,),
    )
    return Redis.from_url(
        url, socket_connect_timeout=3.0, socket_timeout=socket_timeout, health_check_interval=30, retry=retry
    )


def live_worker_keys(conn: Redis, queue_name: str) -> list[str]:
    """Keys of the workers registered on ``queue_name`` whose registration has not expired
    (rq removes a dead worker from its sets only at the next registry clean-up)."""
    from rq.worker_registration import WORKERS_BY_QUEUE_KEY

    keys = sorted(k.decode() for k in conn.smembers(WORKERS_BY_QUEUE_KEY % queue_name))
    if not keys:
        return []
    with conn.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.exists(key)
        alive = pipe.execute()
    return [k for k, a in zip(keys, alive) if a]


def published_catalogue(conn: Redis) -> dict[str, dict[str, Any]]:
    """Union of the catalogues published by live workers: model name -> entry (with the
    number of workers serving it)."""
    keys = sorted(
        set(live_worker_keys(conn, QUEUE_NAMES[JobKind.CLASSIFY]))
        | set(live_worker_keys(conn, QUEUE_NAMES[JobKind.EXPLAIN]))
    )
    if not keys:
        return {}
    with conn.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.hget(key, CATALOGUE_FIELD)
        raw = pipe.execute()
    out: dict[str, dict[str, Any]] = {}
    for blob in raw:
        if not blob:
            continue
        for entry in json.loads(blob):
            known = out.setdefault(entry["name"], {**entry, "workers": 0})
            known["workers"] += 1
    return out
