"""Taking and claiming a worker's next batch in one round trip (``jobs.rqueue.claiming``) against a real redis-server: the leader and the jobs behind it that share its batch, a take sent again claims nothing more, ids no longer queued are dropped, classify before explain."""

from __future__ import annotations

import os
import time

import pytest
from rq.job import Job, JobStatus
from rq.queue import Queue

from jobs.epoch import new_job_id
from jobs.keys import cancel_key, upload_key
from jobs.queues import JOB_FUNCTIONS, QUEUE_NAMES, JobKind
from jobs.rqueue import claiming, lifecycle, reaping
from jobs.rqueue.layout import SERIALIZER

DB = 9  # shared with tests/jobs/test_lifecycle.py: both flush it around each test


@pytest.fixture
def queue(conn):
    return Queue(QUEUE_NAMES[JobKind.CLASSIFY], connection=conn, serializer=SERIALIZER)


def status(conn, job_id: str) -> str:
    return conn.hget(Job.key_for(job_id), "status").decode()


def submitted(conn, model: str, **meta) -> str:
    """A classify job of ``model`` queued as the API queues one (its upload, its batch
    signature, a wake-up)."""
    from jobs.rqueue import enqueue

    job_id = new_job_id(conn)
    kwargs, job_meta = {"model": model}, {"kind": "classify", "model": model, **meta}
    upload = [["SET", upload_key(job_id), f"sealed {job_id}", "EX", 60]]
    enqueue(conn, JobKind.CLASSIFY, JobKind.CLASSIFY, job_id, kwargs, job_meta, 60, 600, 600, "test", also=upload)
    return job_id


def test_the_next_batch_is_taken_and_claimed_in_one_round_trip_and_a_resend_claims_nothing_more(conn):
    from jobs.keys import wake_key
    from jobs.roundtrips import Tally, tallying

    queues = reaping.queues_by_priority(conn)
    ids = [submitted(conn, m) for m in ("a", "a", "b", "a")]
    conn.set(cancel_key(ids[1]), 1)
    executions = [f"e{i}" for i in range(16)]
    conn.script_load(claiming.CLAIM_NEXT.source)  # as after a worker's first take
    with tallying(Tally()) as trips:
        taken = claiming.claim_next(conn, queues, "w1", 5, most=16, take_id="t1", execution_ids=executions)
    queue, attempts = taken.queue, taken.attempts
    assert trips.count == 1 and queue.name == QUEUE_NAMES[JobKind.CLASSIFY] and taken.more
    # The leader and the job behind it with its signature; "b" ends the batch, and the "a" after it waits.
    assert [a.job.id for a in attempts] == ids[:2] and [a.token for a in attempts] == [1, 1]
    assert [a.upload for a in attempts] == [f"sealed {i}".encode() for i in ids[:2]]
    assert [a.cancel_seen for a in attempts] == [False, True]
    assert conn.lrange(queue.key, 0, -1) == [i.encode() for i in ids[2:]]
    assert conn.llen(queue.intermediate_queue_key) == 0 and conn.llen(wake_key()) == 2  # a wake-up per job claimed
    for attempt in attempts:  # started as rq starts a job, leased, and the copy in hand says so
        assert status(conn, attempt.job.id) == JobStatus.STARTED.value and attempt.job.worker_name == "w1"
        assert attempt.job.get_status(refresh=False) == JobStatus.STARTED and attempt.job.started_at is not None
        assert conn.hget(attempt.job.key, "worker_name") == b"w1" and conn.ttl(attempt.job.key) == -1
        (score,) = [
            s
            for e, s in conn.zrange(f"rq:wip:{queue.name}", 0, -1, withscores=True)
            if e.decode() == attempt.execution.composite_key
        ]
        assert score > time.time() and conn.exists(attempt.execution.key)
        assert lifecycle.holds(conn, attempt) and lifecycle.renew(conn, attempt, 5)
    # Sent again (its reply lost): the same attempts, nothing more claimed.
    again = claiming.claim_next(conn, queues, "w1", 5, most=16, take_id="t1", execution_ids=executions).attempts
    assert [(a.job.id, a.token, a.execution.id) for a in again] == [
        (a.job.id, a.token, a.execution.id) for a in attempts
    ]
    assert conn.llen(queue.key) == 2
    assert lifecycle.finish(conn, attempts[0], {"probs": [1.0]}, 60) and status(conn, ids[0]) == "finished"
    alone, last = (claiming.claim_next(conn, queues, "w1", 5, most=16) for _ in range(2))
    assert [a.job.id for a in alone.attempts] == [ids[2]] and [a.job.id for a in last.attempts] == [ids[3]]
    assert alone.more and not last.more and conn.llen(wake_key()) == 0
    assert claiming.claim_next(conn, queues, "w1", 5, most=16) is None


def test_a_take_skips_ids_that_are_no_longer_queued_and_a_job_without_signature_runs_alone(conn, queue):
    queues = reaping.queues_by_priority(conn)
    gone, cancelled, plain, other, last = (submitted(conn, "a") for _ in range(5))
    conn.delete(Job.key_for(gone))  # expired while it waited
    conn.hset(Job.key_for(cancelled), "status", JobStatus.CANCELED.value)
    conn.hdel(Job.key_for(plain), "aex_batch")  # queued before signatures were written: alone
    attempts = claiming.claim_next(conn, queues, "w1", 5, most=16).attempts
    assert [a.job.id for a in attempts] == [plain]
    assert status(conn, cancelled) == JobStatus.CANCELED.value and conn.lrange(queue.key, 0, -1) == [
        other.encode(),
        last.encode(),
    ]
    attempts = claiming.claim_next(conn, queues, "w1", 5, most=1).attempts  # batching off: one at a time
    assert [a.job.id for a in attempts] == [other]
    # Classify jobs come first; an explain job is taken once none waits.
    explain = Queue(QUEUE_NAMES[JobKind.EXPLAIN], connection=conn, serializer=SERIALIZER)
    explain_id = new_job_id(conn)
    explain.enqueue(JOB_FUNCTIONS[JobKind.EXPLAIN], kwargs={"model": "a"}, job_id=explain_id, meta={})
    taken = [claiming.claim_next(conn, queues, "w1", 5, most=16) for _ in range(2)]
    assert [(t.queue.name, [a.job.id for a in t.attempts]) for t in taken] == [
        (queue.name, [last]),
        (explain.name, [explain_id]),
    ]


def test_a_take_pipelined_behind_the_wake_up_claims_the_job_that_woke_it_in_one_round_trip(conn):
    """``wait_and_claim_next``: blocked on the wake list with its take behind, the worker gets
    the job enqueued meanwhile claimed, in one round trip, its start stamped when it was
    claimed (not when the take was recorded, before it blocked); the wake-up it took off is
    counted; when the time runs out it claims nothing, and a take recorded is known as one."""
    import threading
    from datetime import UTC, datetime, timedelta

    from jobs.keys import wake_key
    from jobs.roundtrips import Tally, tallying

    queues = reaping.queues_by_priority(conn)
    conn.script_load(claiming.CLAIM_NEXT.source)
    assert claiming.wait_and_claim_next(conn, queues, "w1", 5, 0.05, take_id="idle") is None
    assert not claiming.take_recorded(conn, "idle")

    tally, out = Tally(), []

    def blocked() -> None:
        with tallying(tally):
            out.append(claiming.wait_and_claim_next(conn, queues, "w1", 20, 30, most=4, take_id="t2"))

    waiting = threading.Thread(target=blocked)
    waiting.start()
    time.sleep(0.6)  # the take is recorded by now, and blocked
    job_id = submitted(conn, "a")
    waiting.join(30)
    [taken] = out
    assert tally.count == 1 and [a.job.id for a in taken.attempts] == [job_id] and not taken.more
    attempt = taken.attempts[0]
    assert status(conn, job_id) == JobStatus.STARTED.value and lifecycle.holds(conn, attempt)
    job = Job.fetch(job_id, connection=conn, serializer=SERIALIZER)
    enqueued, started = (d if d.tzinfo else d.replace(tzinfo=UTC) for d in (job.enqueued_at, job.started_at))
    assert enqueued <= started <= datetime.now(UTC) + timedelta(seconds=1)
    assert attempt.job.started_at == job.started_at  # the copy in hand says the same
    assert conn.llen(wake_key()) == 0 and claiming.take_recorded(conn, "t2")
    # The same take sent again (a reply lost, or a SIGTERM while blocked): the same attempt.
    again = claiming.claim_next(conn, queues, "w1", 20, most=4, take_id="t2")
    assert [(a.job.id, a.token) for a in again.attempts] == [(job_id, attempt.token)]


def test_a_pipelined_take_loads_its_script_when_redis_lost_it(conn):
    """After a restart or a flush Redis knows no script: the take behind the wake-up loads it
    and takes (the wake-up it took off still counted)."""
    from jobs.keys import wake_key

    queues = reaping.queues_by_priority(conn)
    job_id = submitted(conn, "a")
    conn.script_flush()
    taken = claiming.wait_and_claim_next(conn, queues, "w1", 5, 5, take_id="t3")
    assert [a.job.id for a in taken.attempts] == [job_id] and conn.llen(wake_key()) == 0


def test_a_sigterm_while_blocked_stops_the_worker_or_hands_it_what_its_take_had_claimed(conn):
    """A warm shutdown (SIGTERM) that comes while the worker blocks with its take pipelined
    behind: with nothing claimed it stops at once (rq's StopRequested); when Redis had run
    the take already (here: the same take sent just before), the worker keeps the jobs it
    claimed, marked busy and to stop once they have run, and claims nothing more."""
    import signal

    from rq.exceptions import StopRequested

    from jobs.keys import wake_key
    from jobs.rqueue.worker import QueueWorker

    worker = QueueWorker(conn, name="sigterm-test", job_heartbeat_ttl=20, worker_ttl=60)
    worker._install_signal_handlers()
    try:
        worker._look_first = False
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
        start = time.monotonic()
        with pytest.raises(StopRequested):
            worker._claim_next(5, "idle-take", claiming.execution_ids_for("idle-take", 1))
        assert time.monotonic() - start < 3 and not worker._stop_requested

        worker = QueueWorker(conn, name="sigterm-test-2", job_heartbeat_ttl=20, worker_ttl=60)
        worker._install_signal_handlers()
        worker._look_first = False
        job_ids = [submitted(conn, "a"), submitted(conn, "b")]
        ids = claiming.execution_ids_for("ran", 1)
        first = claiming.claim_next(conn, worker._ordered_queues, worker.name, 20, 1, "ran", ids)
        conn.delete(wake_key())  # so the worker blocks until the signal
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        taken = worker._claim_next(5, "ran", ids)
        assert [a.job.id for a in taken.attempts] == [a.job.id for a in first.attempts] == job_ids[:1]
        assert worker._stop_requested and worker.get_state() == "busy"
        assert conn.lrange(worker._ordered_queues[0].key, 0, -1) == [job_ids[1].encode()]  # nothing more claimed
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def test_a_sigterm_during_a_look_that_claims_nothing_stops_the_worker(conn, monkeypatch):
    """A warm shutdown (SIGTERM) that comes while the worker looks for jobs finds it busy
    (a take may claim some), so rq only notes it, and rq reads the note between jobs only:
    a look that then claims nothing stops the worker at once (StopRequested) rather than
    blocking for the next job, and a worker loop with a stop noted never waits again."""
    import signal
    import threading

    from rq.exceptions import StopRequested

    from jobs.rqueue import worker as worker_module
    from jobs.rqueue.worker import QueueWorker

    real = worker_module.claim_next

    def sigterm_during_the_look(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # handled in this thread before the look's reply is read
        return real(*args, **kwargs)

    worker = QueueWorker(conn, name="sigterm-look", job_heartbeat_ttl=20, worker_ttl=60)
    worker._install_signal_handlers()
    monkeypatch.setattr(worker_module, "claim_next", sigterm_during_the_look)
    try:
        worker._look_first = True
        start = time.monotonic()
        with pytest.raises(StopRequested):
            worker._claim_next(5, "look", claiming.execution_ids_for("look", 1))
        assert time.monotonic() - start < 3 and worker._stop_requested
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    raised: list[BaseException] = []

    def loop() -> None:
        try:
            worker.dequeue_job_and_maintain_ttl(1)
        except BaseException as exc:  # what the loop raised, asserted below
            raised.append(exc)

    looping = threading.Thread(target=loop, daemon=True)
    looping.start()
    looping.join(10)
    assert not looping.is_alive() and [type(e) for e in raised] == [StopRequested]
