"""rq's data layout as aex relies on it: the JSON serializer, its job statuses mapped to aex's, which stored jobs a
worker may run, and the worker registrations with their published catalogues (read by the API).

Part of the adapter over rq (``jobs.rqueue``): nothing outside it reads rq's keys or a job's
private fields. Torch-free: the API imports it.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

from redis import Redis
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException
from rq.utils import str_to_date
from rq.worker_registration import WORKERS_BY_QUEUE_KEY

from jobs.keys import CATALOGUE_FIELD
from jobs.queues import JOB_FUNCTIONS, QUEUE_NAMES, JobKind
from jobs.states import ApiStatus

# Jobs are stored as JSON: nothing in Redis is ever unpickled.
SERIALIZER = JSONSerializer
# What a job's time limit raises in the job's thread (rq's death penalty, SIGALRM).
TIME_LIMIT_EXCEEDED = JobTimeoutException
# A job that names no time limit gets rq's default.
DEFAULT_TIME_LIMIT = Queue.DEFAULT_TIMEOUT


# The stamps of a job's hash (rq's format, UTC: 2026-12-06T21:33:00.123456Z).
DATE_FIELDS = (b"created_at", b"enqueued_at", b"started_at", b"ended_at", b"last_heartbeat")


def _stamp(value: bytes) -> datetime.datetime:
    """rq's ``str_to_date`` of one of its stamps, without ``strptime`` (about 10 us a stamp,
    five a job, at each claim and each answer): a stamp in rq's one current format is read
    by ``fromisoformat``; anything else goes to rq's parser."""
    if len(value) == 27 and value[10:11] == b"T" and value[19:20] == b"." and value[26:27] == b"Z":
        try:
            return datetime.datetime.fromisoformat(value[:26].decode()).replace(tzinfo=datetime.UTC)
        except ValueError:
            pass
    return str_to_date(value)


def restore_job(job: Job, raw: dict[bytes, bytes]) -> Job:
    """``job.restore(raw)`` (its hash as Redis gave it), its stamps read by ``_stamp``: the
    same values as rq's own reading (``tests/jobs/test_rqueue.py``)."""
    stamps = {name: raw[name] for name in DATE_FIELDS if raw.get(name)}
    job.restore({k: v for k, v in raw.items() if k not in stamps} if stamps else raw)
    for name, value in stamps.items():
        setattr(job, name.decode(), _stamp(value))
    return job


def time_limit_of(job: Job) -> int:
    """The job's time limit in seconds."""
    return int(job.timeout or DEFAULT_TIME_LIMIT)


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


def live_worker_keys(conn: Redis, queue_name: str) -> list[str]:
    """Keys of the workers registered on ``queue_name`` whose registration has not expired
    (rq removes a dead worker from its sets only at the next registry clean-up)."""
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
