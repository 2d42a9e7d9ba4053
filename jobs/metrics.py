"""Job counts and durations in Redis, written by every worker (and the reaper of abandoned
jobs) and read by the API's /metrics, so it shows the whole cluster."""

from __future__ import annotations

from typing import Any

from redis import Redis
from redis.client import Pipeline

from jobs.keys import duration_key, outcomes_key
from jobs.queues import JobKind

# Job counts and durations, written by every worker (and the reaper of abandoned jobs) so
# the API's /metrics shows the whole cluster.
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)
# A duration hash's field per bucket: the jobs whose run took more than the bucket below and
# at most this one (``BUCKET_FIELD`` + the bound).
BUCKET_FIELD = "in:"


# abandoned: its worker died and no retry was left (worker_lost); retried: a run cut short
# (its worker died or lost Redis) and the job queued again (not an end: it runs again).
OUTCOMES = ("finished", "failed", "cancelled", "abandoned", "reused", "retried")


def record_job(conn: Redis, kind: str, outcome: str, seconds: float | None) -> None:
    """Count one job end, or retry (``outcome`` in OUTCOMES) and, when known, its run time."""
    with conn.pipeline(transaction=False) as pipe:
        count_job(pipe, kind, outcome, seconds)
        pipe.execute()


def count_job(pipe: Pipeline, kind: str, outcome: str, seconds: float | None) -> None:
    """``record_job``'s commands, added to ``pipe`` (the transaction that ends the job)."""
    pipe.hincrby(outcomes_key(), f"{kind}:{outcome}", 1)
    if seconds is not None and outcome == "finished":
        key = duration_key(kind)
        # One field per job: the smallest bucket that holds it (the reader adds them up into
        # the cumulative buckets; one HINCRBY instead of one per bucket above it, 15 for a
        # classify, in the script that ends the job).
        le = next((le for le in DURATION_BUCKETS if seconds <= le), None)
        if le is not None:
            pipe.hincrby(key, f"{BUCKET_FIELD}{le}", 1)
        pipe.hincrby(key, "count", 1)
        pipe.hincrbyfloat(key, "sum", float(seconds))


def read_job_metrics(conn: Redis) -> dict[str, Any]:
    """{"outcomes": {(kind, outcome): n}, "durations": {kind: {"buckets": [(le, n)], "count", "sum"}}}."""
    with conn.pipeline(transaction=False) as pipe:
        pipe.hgetall(outcomes_key())
        for kind in JobKind:
            pipe.hgetall(duration_key(kind.value))
        raw_outcomes, *raw_durations = pipe.execute()
    outcomes = {}
    for field, n in raw_outcomes.items():
        kind, _, outcome = field.decode().partition(":")
        outcomes[(kind, outcome)] = int(n)
    durations = {}
    for kind, raw in zip(JobKind, raw_durations):
        fields = {k.decode(): v for k, v in raw.items()}
        buckets, below = [], 0
        for le in DURATION_BUCKETS:
            below += int(fields.get(f"{BUCKET_FIELD}{le}", 0))
            # "le:" fields: cumulative counts written by workers before BUCKET_FIELD.
            buckets.append((le, below + int(fields.get(f"le:{le}", 0))))
        durations[kind.value] = {
            "buckets": buckets,
            "count": int(fields.get("count", 0)),
            "sum": float(fields.get("sum", 0.0)),
        }
    return {"outcomes": outcomes, "durations": durations}
