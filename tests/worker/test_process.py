"""The worker process's own machinery (``worker.process.AexWorker``) on a real redis-server, without a model: the lease
thread, started once, renews the leases of every batch in hand and of none once its batch is done."""

from __future__ import annotations

import threading
import time

from jobs.epoch import new_job_id
from jobs.queues import JobKind
from jobs.rqueue import claiming, enqueue
from jobs.rqueue.reaping import queues_by_priority
from worker.process import AexWorker

DB = 5  # no other test uses it


def lease_end(conn, attempt) -> float:
    """When the lease of ``attempt`` runs out (its score in its queue's started registry)."""
    return conn.zscore(f"rq:wip:{attempt.queue.name}", attempt.execution.composite_key)


def renewed(conn, attempt, after: float, within: float = 30.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if lease_end(conn, attempt) > after:
            return True
        time.sleep(0.05)
    return False


def test_one_lease_thread_renews_each_batch_in_hand_and_none_after(conn):
    worker = AexWorker(conn, context=None, name="lease-test", job_heartbeat_ttl=1, worker_ttl=60)
    worker.register_birth()
    for _ in range(2):
        enqueue(conn, JobKind.CLASSIFY, JobKind.CLASSIFY, new_job_id(conn), {"model": "a"}, {}, 60, 60, 60, "t")
    (first,) = claiming.claim_next(conn, queues_by_priority(conn), worker.name, 1, most=1).attempts
    (second,) = claiming.claim_next(conn, queues_by_priority(conn), worker.name, 1, most=1).attempts
    held = [first]
    worker._hold(held)
    thread = worker._lease_thread
    assert renewed(conn, first, lease_end(conn, first))
    worker._release(held)
    held = [second]
    worker._hold(held)
    assert worker._lease_thread is thread and thread.is_alive()  # the same thread, not one per batch
    assert renewed(conn, second, lease_end(conn, second))
    done_at = lease_end(conn, first)  # a turn since the first batch ended: no renewal of it in flight
    assert renewed(conn, second, lease_end(conn, second))
    worker._release(held)
    assert lease_end(conn, first) == done_at  # the first batch's lease was not renewed once it was done
    assert [t for t in threading.enumerate() if t.name == "aex-job-lease"] == [thread]


def test_a_batch_s_ends_are_written_in_the_ending_thread_its_jobs_leased_until_then(conn):
    """The work loop hands a batch's ends over and goes on (``worker.ending``): until they are
    written the jobs stay running and leased (renewed), then each ends finished with its
    result under its attempt, its lease no longer renewed; a worker that stops writes every
    end in hand first (``teardown``)."""
    from rq.job import Job

    from jobs.rqueue.layout import SERIALIZER
    from worker.context import WorkerContext

    context = WorkerContext(settings=None, cipher=None, served=None)
    worker = AexWorker(conn, context=context, name="ends-test", job_heartbeat_ttl=1, worker_ttl=60)
    worker.register_birth()
    for _ in range(2):
        enqueue(conn, JobKind.CLASSIFY, JobKind.CLASSIFY, new_job_id(conn), {"model": "a"}, {}, 60, 60, 60, "t")
    attempts = claiming.claim_next(conn, queues_by_priority(conn), worker.name, 1, most=2).attempts
    assert len(attempts) == 2
    worker._hold(attempts)
    endings = [worker._finished(a, {"n": i}, 0.01) for i, a in enumerate(attempts)]
    gate = threading.Event()
    worker.ender.hand(gate.wait)  # an earlier batch still being written
    worker.ender.hand(lambda: worker._close(attempts, endings))
    for attempt in attempts:  # waiting behind it: still running, and leased
        assert Job.fetch(attempt.job.id, connection=conn, serializer=SERIALIZER).get_status() == "started"
        assert renewed(conn, attempt, lease_end(conn, attempt))
    gate.set()
    worker.teardown()  # returns once the ends in hand are written
    for i, attempt in enumerate(attempts):
        job = Job.fetch(attempt.job.id, connection=conn, serializer=SERIALIZER)
        assert job.get_status() == "finished" and job.return_value() == {"n": i}
    assert not [held for held in worker._leased if held is attempts]


def test_a_job_cancelled_before_its_result_is_written_ends_cancelled(conn):
    """A job whose cancel flag is set while it computes (or while its end waits in the ending
    thread) ends cancelled, not finished: its result, index and count are not written, its
    job_cancelled error is, and what it stored beside its result is deleted; the others of its
    batch finish."""
    from rq.job import Job

    from jobs.keys import cancel_key, images_key
    from jobs.metrics import read_job_metrics
    from jobs.rqueue.layout import SERIALIZER
    from worker.context import WorkerContext

    context = WorkerContext(settings=None, cipher=None, served=None)
    worker = AexWorker(conn, context=context, name="cancel-test", job_heartbeat_ttl=5, worker_ttl=60)
    worker.register_birth()
    for _ in range(2):
        meta = {"kind": "classify"}
        enqueue(conn, JobKind.CLASSIFY, JobKind.CLASSIFY, new_job_id(conn), {"model": "a"}, meta, 60, 60, 60, "t")
    attempts = claiming.claim_next(conn, queues_by_priority(conn), worker.name, 5, most=2).attempts
    assert len(attempts) == 2 and not any(a.cancel_seen for a in attempts)
    worker._hold(attempts)
    endings = [worker._finished(a, {"n": i}, 0.01) for i, a in enumerate(attempts)]
    conn.set(cancel_key(attempts[1].job.id), 1)  # after the claim, before the end
    for attempt in attempts:  # what an explain job stores beside its result
        conn.hset(images_key(attempt.job.id), "input", b"sealed png")
    worker._close(attempts, endings)
    first, second = (Job.fetch(a.job.id, connection=conn, serializer=SERIALIZER) for a in attempts)
    assert first.get_status() == "finished" and first.return_value() == {"n": 0}
    assert second.get_status() == "stopped" and second.meta["error"]["code"] == "job_cancelled"
    assert second.return_value() is None and conn.xlen(f"rq:results:{second.id}") == 1  # its failure
    assert conn.exists(images_key(first.id)) and not conn.exists(images_key(second.id))
    outcomes = read_job_metrics(conn)["outcomes"]
    assert outcomes == {("classify", "finished"): 1, ("classify", "cancelled"): 1}
