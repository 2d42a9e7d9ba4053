"""The contract between the API and the workers: queues, job kinds, statuses, Redis keys.

Both sides import this module, so it must stay free of torch. Jobs are enqueued by dotted
path ("worker.jobs.classify") with small JSON-safe keyword arguments and stored with rq's
JSON serializer: nothing in Redis is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
from enum import Enum
from typing import Any

from redis import Redis
from rq.exceptions import AbandonedJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException

from aex.errors import AexError, JobCancelledError, JobFailedError, JobTimeoutError, WorkerLostError

SERIALIZER = JSONSerializer
PREFIX = "aex"


class JobKind(str, Enum):
    CLASSIFY = "classify"
    EXPLAIN = "explain"


# Queue names in the order workers serve them: classify is the high-priority queue.
QUEUE_NAMES: dict[JobKind, str] = {JobKind.CLASSIFY: "aex-classify", JobKind.EXPLAIN: "aex-explain"}
JOB_FUNCTIONS: dict[JobKind, str] = {JobKind.CLASSIFY: "worker.jobs.classify", JobKind.EXPLAIN: "worker.jobs.explain"}


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

# Target words the API accepts besides class names and indices (models.explain knows more aliases).
TARGET_WORDS = ("predicted", "runner-up", "all")


def upload_key(job_id: str) -> str:
    """The uploaded bytes of a job (a string with the upload TTL)."""
    return f"{PREFIX}:upload:{job_id}"


def images_key(job_id: str) -> str:
    """PNG results of a job: a hash name -> PNG bytes (with the result TTL)."""
    return f"{PREFIX}:images:{job_id}"


def cancel_key(job_id: str) -> str:
    """Set by DELETE /v1/jobs/{id}; a running job checks it between steps."""
    return f"{PREFIX}:cancel:{job_id}"


def dicom_key(job_id: str) -> str:
    """DICOM results of a job: a hash name -> Part 10 bytes (with the result TTL)."""
    return f"{PREFIX}:dicom:{job_id}"


def result_index_key(cache_key: str) -> str:
    """The id of the job whose finished result answers ``cache_key`` (result TTL)."""
    return f"{PREFIX}:result:{cache_key}"


def callback_key(job_id: str) -> str:
    """The delivery record of a job's callback (JSON, with the result TTL)."""
    return f"{PREFIX}:callback:{job_id}"


# --- parameters and result reuse ---------------------------------------------------------
# A job's parameters are built once, by the API, with these functions; the worker gets them
# as its keyword arguments, records them in the result's provenance and keys the result on
# them. Same input bytes + same checkpoint file + same parameters (+ same aex version) =
# same result, which is then served again instead of being recomputed.


def _window(window_center: float | None, window_width: float | None) -> list[float] | None:
    return None if window_center is None else [float(window_center), float(window_width)]


def classify_parameters(top_k: int, stability: bool, stability_steps: int,
                        window_center: float | None = None, window_width: float | None = None) -> dict[str, Any]:
    """The canonical parameters of a classify job (stability_steps only with stability)."""
    return {"top_k": int(top_k), "stability": bool(stability),
            "stability_steps": int(stability_steps) if stability else None,
            "window": _window(window_center, window_width)}


def explain_parameters(targets: list[str], rho: float, steps: int, layer: str | None, stability_steps: int,
                       window_center: float | None = None, window_width: float | None = None) -> dict[str, Any]:
    """The canonical parameters of an explain job; ``layer`` is the resolved layer name."""
    return {"targets": [str(t).strip() for t in targets], "rho": float(rho), "steps": int(steps), "layer": layer,
            "stability_steps": int(stability_steps), "window": _window(window_center, window_width)}


def result_cache_key(kind: str, model: str, checkpoint_sha256: str, input_sha256: str,
                     parameters: dict[str, Any], version: str) -> str:
    """sha256 of everything a result depends on, as canonical JSON."""
    material = {"kind": kind, "model": model, "checkpoint_sha256": checkpoint_sha256,
                "input_sha256": input_sha256, "parameters": parameters, "aex": version}
    blob = json.dumps(material, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(blob.encode()).hexdigest()


# Field of rq's worker hash where each worker publishes the checkpoints it serves: the
# catalogue lives exactly as long as the worker's registration does.
CATALOGUE_FIELD = "aex_models"

# Job counts and durations, written by every worker (and the reaper of abandoned jobs) so
# the API's /metrics shows the whole cluster.
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)
OUTCOMES = ("finished", "failed", "cancelled", "abandoned", "reused")


def _duration_key(kind: str) -> str:
    return f"{PREFIX}:metrics:duration:{kind}"


def _outcome_key() -> str:
    return f"{PREFIX}:metrics:outcomes"


def record_job(conn: Redis, kind: str, outcome: str, seconds: float | None) -> None:
    """Count one job end (``outcome`` in OUTCOMES) and, when known, its run time."""
    with conn.pipeline(transaction=False) as pipe:
        pipe.hincrby(_outcome_key(), f"{kind}:{outcome}", 1)
        if seconds is not None and outcome == "finished":
            key = _duration_key(kind)
            for le in DURATION_BUCKETS:
                if seconds <= le:
                    pipe.hincrby(key, f"le:{le}", 1)
            pipe.hincrby(key, "count", 1)
            pipe.hincrbyfloat(key, "sum", float(seconds))
        pipe.execute()


def read_job_metrics(conn: Redis) -> dict[str, Any]:
    """{"outcomes": {(kind, outcome): n}, "durations": {kind: {"buckets": [(le, n)], "count", "sum"}}}."""
    with conn.pipeline(transaction=False) as pipe:
        pipe.hgetall(_outcome_key())
        for kind in JobKind:
            pipe.hgetall(_duration_key(kind.value))
        raw_outcomes, *raw_durations = pipe.execute()
    outcomes = {}
    for field, n in raw_outcomes.items():
        kind, _, outcome = field.decode().partition(":")
        outcomes[(kind, outcome)] = int(n)
    durations = {}
    for kind, raw in zip(JobKind, raw_durations):
        fields = {k.decode(): v for k, v in raw.items()}
        durations[kind.value] = {
            "buckets": [(le, int(fields.get(f"le:{le}", 0))) for le in DURATION_BUCKETS],
            "count": int(fields.get("count", 0)),
            "sum": float(fields.get("sum", 0.0)),
        }
    return {"outcomes": outcomes, "durations": durations}


def connect(url: str, socket_timeout: float | None = None) -> Redis:
    """A Redis client for ``url`` (redis://, rediss:// or unix://) that fails fast when the
    server is gone instead of hanging."""
    return Redis.from_url(url, socket_connect_timeout=3.0, socket_timeout=socket_timeout,
                          health_check_interval=30)


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
    keys = sorted(set(live_worker_keys(conn, QUEUE_NAMES[JobKind.CLASSIFY]))
                  | set(live_worker_keys(conn, QUEUE_NAMES[JobKind.EXPLAIN])))
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



def job_kind(job: Job) -> str:
    return str(job.meta.get("kind", "unknown"))


def error_of(exc_type, exc_value) -> dict[str, str]:
    """{"code", "message"} for the exception that ended a job, as the API reports it."""
    if isinstance(exc_value, AexError):
        return {"code": exc_value.code, "message": exc_value.message}
    if exc_type is not None and issubclass(exc_type, JobTimeoutException):
        return {"code": JobTimeoutError.code, "message": f"the job ran past its time limit ({exc_value})"}
    if exc_type is not None and issubclass(exc_type, AbandonedJobError):
        return {"code": WorkerLostError.code,
                "message": "the worker running this job stopped (killed, out of memory or lost); submit it again"}
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
        from .callbacks import notify_job_end

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
