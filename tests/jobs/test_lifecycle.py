"""The fenced life of a job attempt (``jobs.rqueue.lifecycle``) against a real redis-server: one claim per queued job,
ends written once under the attempt's token, a late or repeated writer refused or recognised,
the reaper's requeue and ``worker_lost``, and the rq layout these rely on."""

from __future__ import annotations

import time

import pytest
from rq.job import Job, JobStatus
from rq.queue import Queue

from jobs.epoch import new_job_id
from jobs.failures import LOST
from jobs.keys import cancel_key, upload_key
from jobs.queues import JOB_FUNCTIONS, QUEUE_NAMES, JobKind
from jobs.rqueue import lifecycle, reaping, taking
from jobs.rqueue.layout import SERIALIZER

DB = 9


@pytest.fixture
def queue(conn):
    return Queue(QUEUE_NAMES[JobKind.CLASSIFY], connection=conn, serializer=SERIALIZER)


def queued(conn, queue) -> Job:
    """A queued classify job with an upload, taken into the queue's intermediate list."""
    job_id = new_job_id(conn)
    conn.set(upload_key(job_id), b"sealed", ex=60)
    queue.enqueue(JOB_FUNCTIONS[JobKind.CLASSIFY], kwargs={"model": "m"}, job_id=job_id, meta={"kind": "classify"})
    job = taking.take(conn, queue)
    assert job is not None and job.id == job_id
    return job


def status(conn, job_id: str) -> str:
    return conn.hget(f"rq:job:{job_id}", "status").decode()


def test_a_job_is_claimed_once_and_runs_visibly(conn, queue):
    job = queued(conn, queue)
    assert conn.lrange(queue.intermediate_queue_key, 0, -1) == [job.id.encode()]
    attempt = lifecycle.claim(conn, job, queue, "w1", 5)
    assert attempt is not None and attempt.token == 1
    assert status(conn, job.id) == JobStatus.STARTED.value
    assert conn.hget(job.key, "worker_name") == b"w1" and conn.hget(job.key, "started_at")
    assert conn.lrange(queue.intermediate_queue_key, 0, -1) == []  # left the intermediate list
    # rq's layout relied on: a lease is "<job id>:<execution id>" in rq:wip:<queue>, scored by its end.
    (entry, score), *_ = conn.zrange(f"rq:wip:{queue.name}", 0, -1, withscores=True)
    assert entry.decode().startswith(f"{job.id}:") and score > time.time()
    # The same job taken again (a duplicated push) is not claimed a second time.
    conn.rpush(queue.key, job.id)
    again = taking.take(conn, queue)
    assert lifecycle.claim(conn, again, queue, "w2", 5) is None
    assert conn.lrange(queue.intermediate_queue_key, 0, -1) == []


def test_an_end_is_written_once_and_a_late_writer_is_refused(conn, queue):
    job = queued(conn, queue)
    attempt = lifecycle.claim(conn, job, queue, "w1", 5)
    assert lifecycle.finish(conn, attempt, {"probs": [1.0]}, 60)
    assert status(conn, job.id) == JobStatus.FINISHED.value
    assert not conn.exists(upload_key(job.id))  # deleted with the end, in one transaction
    assert conn.zcard(f"rq:wip:{queue.name}") == 0
    results = conn.xlen(f"rq:results:{job.id}")
    # The same end again (a reply lost to a Redis restart, the call repeated): recognised, not rewritten.
    assert lifecycle.finish(conn, attempt, {"probs": [1.0]}, 60)
    assert conn.xlen(f"rq:results:{job.id}") == results
    # Another attempt's late write (a fenced-out worker) changes nothing.
    stale = lifecycle.Attempt(job, queue, attempt.token - 1, attempt.execution)
    assert not lifecycle.fail(conn, stale, {"code": "job_failed", "message": "late"}, "trace")
    assert status(conn, job.id) == JobStatus.FINISHED.value
    assert Job.fetch(job.id, connection=conn, serializer=SERIALIZER).return_value() == {"probs": [1.0]}


def test_the_reaper_requeues_then_fails_worker_lost_and_fences_the_old_worker(conn, queue):
    job = queued(conn, queue)
    first = lifecycle.claim(conn, job, queue, "w1", 1)
    time.sleep(1.2)  # its lease runs out: the worker died
    (reaped,) = reaping.reap(conn, queue, retries=1, lost_error=LOST)
    assert reaped.outcome == "requeued" and status(conn, job.id) == JobStatus.QUEUED.value
    assert conn.lrange(queue.key, 0, -1) == [job.id.encode()] and conn.exists(upload_key(job.id))
    # The first worker comes back: its renewal and its end are refused.
    assert not lifecycle.renew(conn, first, 5) and first.lost
    assert not lifecycle.finish(conn, first, {"probs": [0.5]}, 60)
    assert status(conn, job.id) == JobStatus.QUEUED.value
    # Its second run dies too: no retry is left.
    second = lifecycle.claim(conn, taking.take(conn, queue), queue, "w2", 1)
    assert second.token > first.token
    time.sleep(1.2)
    (reaped,) = reaping.reap(conn, queue, retries=1, lost_error=LOST)
    assert reaped.outcome == "failed" and status(conn, job.id) == JobStatus.FAILED.value
    meta = Job.fetch(job.id, connection=conn, serializer=SERIALIZER).meta
    assert meta["error"]["code"] == "worker_lost" and meta["retried"] == 1
    assert not conn.exists(upload_key(job.id)) and conn.zcard(f"rq:wip:{queue.name}") == 0
    assert reaping.reap(conn, queue, retries=1, lost_error=LOST) == []  # nothing twice


def test_a_live_lease_is_not_reaped_and_a_cancelled_job_ends_cancelled(conn, queue):
    job = queued(conn, queue)
    attempt = lifecycle.claim(conn, job, queue, "w1", 1)
    time.sleep(0.6)
    assert lifecycle.renew(conn, attempt, 5)
    time.sleep(0.6)
    assert reaping.reap(conn, queue, retries=2, lost_error=LOST) == []  # renewed: still its worker's
    conn.set(cancel_key(job.id), 1)
    conn.zadd(f"rq:wip:{queue.name}", {f"{job.id}:{attempt.execution.id}": time.time() - 1})
    (reaped,) = reaping.reap(conn, queue, retries=2, lost_error=LOST)
    assert reaped.outcome == "cancelled" and status(conn, job.id) == JobStatus.STOPPED.value


def test_a_job_taken_but_never_claimed_is_put_back(conn, queue):
    job = queued(conn, queue)  # its worker died right after taking it
    assert taking.requeue_stranded(conn, queue) == []  # first seen now
    conn.set(queue.intermediate_queue.get_first_seen_key(job.id), time.time() - 120)
    assert taking.requeue_stranded(conn, queue) == [job.id]
    assert conn.lrange(queue.key, 0, -1) == [job.id.encode()]


def test_a_batch_is_taken_claimed_and_ended_in_one_round_trip_each(conn, queue):
    from jobs.keys import wake_key
    from jobs.roundtrips import Tally, tallying

    ids = []
    for i in range(4):
        job_id = new_job_id(conn)
        conn.set(upload_key(job_id), f"sealed {i}".encode(), ex=60)
        queue.enqueue(JOB_FUNCTIONS[JobKind.CLASSIFY], kwargs={"model": "m"}, job_id=job_id, meta={"kind": "classify"})
        conn.rpush(wake_key(), 1)  # as the API's enqueue does
        ids.append(job_id)
    conn.set(cancel_key(ids[2]), 1)
    with tallying(Tally()) as trips:
        jobs = taking.take_some(conn, queue, 3)
    assert [j.id for j in jobs] == ids[:3] and trips.count == 1 and jobs[1].kwargs == {"model": "m"}
    assert conn.llen(wake_key()) == 1  # one wake-up taken per job taken
    # Put back in order at the head (a job that does not fit, and those taken after it).
    taking.untake_all(conn, queue, [ids[1], ids[2]])
    assert conn.lrange(queue.key, 0, -1) == [i.encode() for i in (ids[1], ids[2], ids[3])]
    jobs = [jobs[0], *taking.take_some(conn, queue, 3)]
    conn.hset(jobs[3].key, "status", JobStatus.CANCELED.value)  # cancelled meanwhile: not claimed
    with tallying(Tally()) as trips:
        attempts = lifecycle.claim_all(conn, jobs, queue, "w1", 5)
    assert trips.count == 1 and attempts[3] is None and conn.llen(queue.intermediate_queue_key) == 0
    assert [a.upload for a in attempts[:3]] == [b"sealed 0", b"sealed 1", b"sealed 2"]
    assert [a.cancel_seen for a in attempts[:3]] == [False, False, True]
    assert all(status(conn, i) == JobStatus.STARTED.value for i in ids[:3])
    stale = lifecycle.Attempt(attempts[2].job, queue, attempts[2].token + 5, attempts[2].execution)
    ends = [
        lifecycle.finishing(conn, attempts[0], {"probs": [1.0]}, 60),
        lifecycle.failing(conn, attempts[1], {"code": "job_failed", "message": "no"}, "trace"),
        lifecycle.finishing(conn, stale, {"probs": [0.0]}, 60),  # another token: refused
    ]
    with tallying(Tally()) as trips:
        assert lifecycle.write_ends(conn, ends) == [True, True, False]
    assert trips.count == 1
    assert [status(conn, i) for i in ids[:3]] == ["finished", "failed", "started"]
    assert not conn.exists(upload_key(ids[0])) and not conn.exists(upload_key(ids[1]))
    assert lifecycle.write_ends(conn, ends[:2]) == [True, True]  # sent again: recognised, not rewritten
    assert conn.xlen(f"rq:results:{ids[0]}") == 1


def test_a_claim_sent_twice_keeps_its_token(conn, queue):
    """A claim whose reply was lost (the command sent again) is recognised by its execution."""
    job = queued(conn, queue)
    attempt = lifecycle.claim(conn, job, queue, "w1", 5)
    replay = lifecycle.CLAIM(
        conn,
        [job.key],
        [queue.intermediate_queue_key, job.id, attempt.execution.key, cancel_key(job.id), upload_key(job.id), 0],
    )
    assert [int(x) for x in replay[0][:2]] == [attempt.token, 0]
    assert int(conn.hget(job.key, lifecycle.ATTEMPT_FIELD)) == attempt.token


def test_a_result_is_not_written_while_its_unless_key_is_there(conn, queue):
    """``End.unless`` (the job's cancel flag): checked by the end's own write, atomically;
    nothing is written, the attempt still holds the job and can end it otherwise."""
    job = queued(conn, queue)
    attempt = lifecycle.claim(conn, job, queue, "w1", 5)
    conn.set(cancel_key(job.id), 1)
    end = lifecycle.finishing(conn, attempt, {"probs": [1.0]}, 60, unless=cancel_key(job.id))
    assert lifecycle.write_ends(conn, [end]) == [None]
    assert status(conn, job.id) == JobStatus.STARTED.value and conn.xlen(f"rq:results:{job.id}") == 0
    assert conn.exists(upload_key(job.id))
    stopped = lifecycle.failing(conn, attempt, {"code": "job_cancelled", "message": "c"}, "trace", stopped=True)
    assert lifecycle.write_ends(conn, [stopped]) == [True]
    assert status(conn, job.id) == JobStatus.STOPPED.value
    other = queued(conn, queue)  # without the key: written as any end
    attempt = lifecycle.claim(conn, other, queue, "w1", 5)
    end = lifecycle.finishing(conn, attempt, {"probs": [1.0]}, 60, unless=cancel_key(other.id))
    assert lifecycle.write_ends(conn, [end]) == [True] and status(conn, other.id) == "finished"
