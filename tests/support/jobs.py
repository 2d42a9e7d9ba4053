"""Jobs in a real Redis without a worker process: an idle worker's registration (so the API admits jobs to its queues; nothing ever takes them), and a queued job taken, claimed and finished with the workers' own functions (``jobs.rqueue.taking``, ``jobs.rqueue.lifecycle``), indexed for reuse as a worker that ran it would.

For the unit tests of the API's job layer (tests/service/test_jobs.py, test_reuse.py,
test_views.py, test_admission.py): what the worker would have written is written by the
worker's code, only no worker runs the job's function.
"""

from __future__ import annotations

from typing import Any

from jobs.keys import scoped_result_index_key
from jobs.queues import QUEUE_NAMES, JobKind


def idle_worker(conn, name: str = "idle-worker", queue_names=None, catalogue: list[dict] | None = None, ttl: int = 60):
    """A worker registered on ``queue_names`` (default: every queue), with ``catalogue``
    published, that never takes a job; ``.register_death()`` removes it."""
    from jobs.rqueue.worker import QueueWorker

    worker = QueueWorker(conn, name=name, queue_names=queue_names, catalogue=catalogue, worker_ttl=ttl)
    worker.register_birth()
    return worker


def finish_next(conn, lane: JobKind, result: Any, result_ttl: int = 600, index: bool = True) -> str:
    """Take the next job of the queue of ``lane``, claim it and finish it with ``result`` as a
    worker does, and (``index``) point its cache key within its reuse scope at it, as a worker
    does when AEX_REUSE_RESULTS is on. Returns its id."""
    from jobs.rqueue import lifecycle, reaping, taking

    queue = reaping.queue_named(conn, QUEUE_NAMES[lane])
    job = taking.take(conn, queue)
    assert job is not None, f"nothing queued on {queue.name}"
    attempt = lifecycle.claim(conn, job, queue, "test-worker", 30)
    assert attempt is not None
    assert lifecycle.finish(conn, attempt, result, result_ttl)
    key, scope = job.meta.get("cache_key"), job.meta.get("reuse_scope")
    if index and key and scope:
        conn.set(scoped_result_index_key(scope, key), job.id, ex=result_ttl)
    return job.id
