"""The queue gauges an autoscaler scales workers on (``service.metrics``): jobs waiting, jobs
running (live leases) and the age of the oldest waiting job, per queue, read from a real Redis
as a scrape of /metrics renders them; and the /metrics row of docs/api.md names each of them."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

from prometheus_client import generate_latest
from rq.queue import Queue
from rq.utils import now, utcformat

from jobs.epoch import new_job_id
from jobs.queues import JOB_FUNCTIONS, QUEUE_NAMES, JobKind
from jobs.rqueue import lifecycle, taking
from jobs.rqueue.layout import SERIALIZER
from service.metrics import Metrics

DB = 9  # shared with tests/jobs/test_lifecycle.py: both flush it around each test
API_PAGE = Path(__file__).resolve().parents[2] / "docs" / "api.md"
QUEUE_GAUGES = ("aex_queue_depth", "aex_jobs_running", "aex_queue_oldest_age_seconds")


def scrape(metrics: Metrics) -> dict[tuple[str, str], float]:
    """{(family, queue): value} of the queue gauges, from the text a scrape returns."""
    text = generate_latest(metrics.registry).decode()
    found = {}
    for name, queue, value in re.findall(r'^(aex_[a-z_]+)\{queue="([a-z]+)"\} (\S+)$', text, re.M):
        found[(name, queue)] = float(value)
    return found


def test_waiting_running_and_the_oldest_wait_per_queue(redis_db):
    conn = redis_db(DB)
    metrics = Metrics(conn)
    empty = scrape(metrics)
    for name in QUEUE_GAUGES:
        for kind in JobKind:
            assert empty[(name, kind.value)] == 0.0, (name, kind)

    explain = Queue(QUEUE_NAMES[JobKind.EXPLAIN], connection=conn, serializer=SERIALIZER)
    ids = []
    for _ in range(3):
        job_id = new_job_id(conn)
        explain.enqueue(JOB_FUNCTIONS[JobKind.EXPLAIN], kwargs={"model": "m"}, job_id=job_id, meta={"kind": "explain"})
        ids.append(job_id)
    # The first was submitted 90 s ago; the second 30 s ago.
    conn.hset(f"rq:job:{ids[0]}", "enqueued_at", utcformat(now() - timedelta(seconds=90)))
    conn.hset(f"rq:job:{ids[1]}", "enqueued_at", utcformat(now() - timedelta(seconds=30)))
    seen = scrape(metrics)
    assert seen[("aex_queue_depth", "explain")] == 3.0 and seen[("aex_jobs_running", "explain")] == 0.0
    assert 90.0 <= seen[("aex_queue_oldest_age_seconds", "explain")] < 3600.0
    assert seen[("aex_queue_oldest_age_seconds", "classify")] == 0.0

    # A worker takes and claims the head: it runs (a live lease) and the next one is the oldest.
    job = taking.take(conn, explain)
    attempt = lifecycle.claim(conn, job, explain, "w1", 60)
    assert attempt is not None and job.id == ids[0]
    seen = scrape(metrics)
    assert seen[("aex_queue_depth", "explain")] == 2.0 and seen[("aex_jobs_running", "explain")] == 1.0
    assert 30.0 <= seen[("aex_queue_oldest_age_seconds", "explain")] < 90.0
    assert seen[("aex_jobs_running", "classify")] == 0.0

    # Its worker dies: once the lease has run out the job no longer counts as running, though
    # no reaper has seen it yet (it is still started in its hash).
    registry = explain.started_job_registry.key
    (entry,) = conn.zrange(registry, 0, -1)
    conn.zadd(registry, {entry: 1.0})
    assert scrape(metrics)[("aex_jobs_running", "explain")] == 0.0
    assert conn.hget(f"rq:job:{job.id}", "status") == b"started"

    # A job whose hash expired at the head is skipped; the next one gives the age.
    conn.delete(f"rq:job:{ids[1]}")
    assert scrape(metrics)[("aex_queue_oldest_age_seconds", "explain")] < 30.0


def test_the_api_page_names_every_queue_gauge():
    row = next(
        line for line in API_PAGE.read_text(encoding="utf-8").splitlines() if line.startswith("| `GET /metrics`")
    )
    missing = [name for name in (*QUEUE_GAUGES, "aex_workers") if f"`{name}{{queue}}`" not in row]
    assert not missing, f"docs/api.md's /metrics row does not name {missing}"
