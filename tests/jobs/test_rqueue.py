"""The rq behaviour the adapter (``jobs.rqueue``) relies on, pinned against a real redis-server:
status names, key layout, queue order and LREM, the Result stream, the stop-job command."""

from __future__ import annotations

import json
import time
from datetime import UTC

from rq.command import PUBSUB_CHANNEL_TEMPLATE
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.results import Result
from rq.worker import SimpleWorker

from jobs import rqueue
from jobs.epoch import new_job_id
from jobs.queues import QUEUE_NAMES, JobKind
from jobs.rqueue.layout import SERIALIZER, STATUS_FROM_RQ, restore_job
from jobs.states import TERMINAL, ApiStatus

DB = 8  # shared with tests/jobs/test_crypto.py: both flush it around each test


def enqueue(conn, kind=JobKind.CLASSIFY, lane=JobKind.CLASSIFY, **meta) -> str:
    job_id = new_job_id(conn)
    rqueue.enqueue(
        conn,
        lane,
        kind,
        job_id,
        kwargs={"model": "m"},
        meta={"kind": kind.value, "model": "m", **meta},
        timeout=60,
        result_ttl=120,
        wait_ttl=300,
        description=f"{kind.value} m",
    )
    return job_id


def test_every_rq_status_has_one_api_status():
    assert set(STATUS_FROM_RQ) == set(JobStatus)
    assert {s.value for s in JobStatus} == {
        "created", "queued", "finished", "failed", "started", "deferred", "scheduled",
        "stopped", "canceled", "rate_limited", "ready_to_enqueue",
    }  # fmt: skip
    ended = {s for s, api in STATUS_FROM_RQ.items() if api in TERMINAL}
    assert ended == {JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED}
    assert STATUS_FROM_RQ[JobStatus.STARTED] is ApiStatus.RUNNING


def test_the_redis_key_layout_of_rq(conn):
    name = QUEUE_NAMES[JobKind.CLASSIFY]
    queue = Queue(name, connection=conn, serializer=SERIALIZER)
    assert queue.key == f"rq:queue:{name}" and queue.started_job_registry.key == f"rq:wip:{name}"
    assert Job.key_for("abc") == "rq:job:abc"
    assert Result.get_key("abc") == "rq:results:abc"
    assert PUBSUB_CHANNEL_TEMPLATE % "w1" == "rq:pubsub:w1"


def test_enqueue_appends_to_the_queue_and_the_record_reads_the_job_hash(conn):
    first, second = enqueue(conn), enqueue(conn, callback={"url": "https://x.example.org/h"})
    key = f"rq:queue:{QUEUE_NAMES[JobKind.CLASSIFY]}"
    assert [i.decode() for i in conn.lrange(key, 0, -1)] == [first, second]  # the tail
    assert conn.hget(f"rq:job:{second}", "status") == b"queued"
    assert rqueue.queue_depth(conn, JobKind.CLASSIFY) == 2 and rqueue.queue_depth(conn, JobKind.EXPLAIN) == 0

    record = rqueue.fetch_job(conn, second)
    assert record.id == second and record.kind is JobKind.CLASSIFY and record.model == "m"
    assert record.status is ApiStatus.QUEUED and record.origin == QUEUE_NAMES[JobKind.CLASSIFY]
    assert record.meta["callback"] == {"url": "https://x.example.org/h"}
    assert record.enqueued_at.tzinfo is UTC and abs(time.time() - record.enqueued_at.timestamp()) < 60
    assert record.started_at is None and record.ended_at is None and record.result is None
    assert rqueue.queue_position(conn, record) == 1
    assert rqueue.queue_position(conn, rqueue.fetch_job(conn, first)) == 0
    assert rqueue.fetch_job(conn, new_job_id(conn)) is None
    assert rqueue.job_statuses(conn, [first, new_job_id(conn)]) == [ApiStatus.QUEUED, None]
    assert rqueue.job_statuses(conn, []) == []


def test_cancel_queued_takes_the_id_out_once(conn):
    job_id, other = enqueue(conn, lane=JobKind.EXPLAIN), enqueue(conn, lane=JobKind.EXPLAIN)
    record = rqueue.fetch_job(conn, job_id)
    assert rqueue.cancel_queued(conn, record) is True
    key = f"rq:queue:{QUEUE_NAMES[JobKind.EXPLAIN]}"
    assert [i.decode() for i in conn.lrange(key, 0, -1)] == [other]
    assert rqueue.fetch_job(conn, job_id).status is ApiStatus.CANCELLED
    assert conn.hget(f"rq:job:{job_id}", "status") == b"canceled"
    assert rqueue.cancel_queued(conn, record) is False  # LREM found nothing: not cancelled twice

    # A worker took the id (it is in no queue): the caller must stop it instead.
    taken = rqueue.fetch_job(conn, other)
    assert conn.lrem(key, 0, other) == 1
    assert rqueue.cancel_queued(conn, taken) is False
    assert rqueue.fetch_job(conn, other).status is ApiStatus.QUEUED


def test_stop_running_publishes_the_stop_job_command_on_the_workers_channel(conn):
    job_id = enqueue(conn)
    pubsub = conn.pubsub()
    pubsub.subscribe("rq:pubsub:worker-a")
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"
    rqueue.stop_running(conn, job_id)  # no worker runs it: nothing is sent, nothing raised
    assert pubsub.get_message(timeout=0.5) is None
    rqueue.stop_running(conn, new_job_id(conn))  # unknown job: nothing raised

    conn.hset(f"rq:job:{job_id}", "worker_name", "worker-a")
    rqueue.stop_running(conn, job_id)
    message = pubsub.get_message(timeout=5)
    assert message["channel"] == b"rq:pubsub:worker-a"
    assert json.loads(message["data"]) == {"command": "stop-job", "job_id": job_id}
    pubsub.close()


def test_a_lease_has_expired_when_every_score_of_the_job_in_the_started_registry_is_past(conn):
    job_id = enqueue(conn)
    queue = QUEUE_NAMES[JobKind.CLASSIFY]
    conn.lrem(f"rq:queue:{queue}", 0, job_id)  # a worker took it and started it
    conn.hset(f"rq:job:{job_id}", "status", "started")
    conn.zadd(f"rq:wip:{queue}", {f"{job_id}:execution-1": time.time() + 60})  # rq 3: id:execution
    record = rqueue.fetch_job(conn, job_id)
    assert record.status is ApiStatus.RUNNING and not rqueue.lease_expired(conn, record)
    conn.zadd(f"rq:wip:{queue}", {f"{job_id}:execution-1": time.time() - 2})
    assert rqueue.lease_expired(conn, record)
    conn.zadd(f"rq:wip:{queue}", {f"{job_id}:execution-2": time.time() + 60})  # a newer lease, live
    assert not rqueue.lease_expired(conn, record)
    conn.zadd(f"rq:wip:{queue}", {f"{job_id}:execution-2": time.time() - 2, f"{job_id}0:e": time.time() + 60})
    assert rqueue.lease_expired(conn, record)  # every lease of its own ran out


def test_each_end_appends_to_the_result_stream(conn):
    """rq's Result stream: a finished job's return value, a failed job's text, and what
    ``wait_for_end`` returns on (jobs run here by rq's in-process worker)."""
    queue = Queue(QUEUE_NAMES[JobKind.EXPLAIN], connection=conn, serializer=SERIALIZER)
    ok = queue.enqueue("math.sqrt", 16.0, meta={"kind": "classify"}, result_ttl=100)
    bad = queue.enqueue("math.sqrt", -1.0, meta={"kind": "classify"}, failure_ttl=100)
    assert conn.xlen(Result.get_key(ok.id)) == 0 and rqueue.result_ttl_left(conn, ok.id) < 0
    SimpleWorker([queue], connection=conn, serializer=SERIALIZER).work(burst=True)

    assert conn.xlen(Result.get_key(ok.id)) == 1 and conn.xlen(Result.get_key(bad.id)) == 1
    assert rqueue.wait_for_end(conn, ok.id, 30) == (
        rqueue.fetch_job(conn, ok.id),
        None,
    )  # at once: the stream has an entry
    done = rqueue.fetch_job(conn, ok.id)
    assert done.status is ApiStatus.FINISHED and done.result == 4.0 and done.failure is None
    assert done.started_at <= done.ended_at and done.ended_at.tzinfo is UTC
    assert 90 < rqueue.result_ttl_left(conn, ok.id) <= 100
    failed = rqueue.fetch_job(conn, bad.id)
    assert failed.status is ApiStatus.FAILED and failed.result is None
    assert "ValueError: math domain error" in failed.failure


def within_a_share() -> dict:
    """The arguments of a classify enqueued within a share (``aex:test-share``, 5 places) with
    its upload (``aex:test-upload``), but its id."""
    from jobs.rqueue import Share

    share = Share("aex:test-share", limit=5, ttl=60, reservation_seconds=30)
    return dict(
        lane=JobKind.CLASSIFY,
        kind=JobKind.CLASSIFY,
        kwargs={"model": "m"},
        meta={"kind": "classify"},
        timeout=60,
        result_ttl=60,
        wait_ttl=60,
        description="classify m",
        share=share,
        also=[["SET", "aex:test-upload", "sealed"]],
    )


def test_an_enqueue_sent_again_after_its_reply_was_lost_does_nothing_twice(conn):
    """The enqueue step (share, upload, job, wake-up) run a second time, as a command resent
    after a lost reply would: the job is queued once, its place held once, nothing rewritten."""
    args = within_a_share()
    job_id = new_job_id(conn)
    assert rqueue.enqueue(conn, job_id=job_id, **args)
    assert rqueue.enqueue(conn, job_id=job_id, **args)
    assert conn.lrange("rq:queue:aex-classify", 0, -1) == [job_id.encode()]
    assert conn.zcard("aex:test-share") == 1 and conn.get("aex:test-upload") == b"sealed"


def test_an_enqueue_under_conditions_writes_nothing_at_all_when_one_of_them_moved(conn):
    """The enqueue step written under conditions (a key absent, a key holding a value, a list
    shorter than a length), checked where it is written: each one that does not hold raises
    ``Moved`` with nothing written, not even the commands written first whatever the share
    says; when they all hold the job is queued with its place, as without them."""
    import pytest

    from jobs.rqueue import Moved, absent, holding, shorter_than

    queue = "rq:queue:aex-classify"
    conn.set("aex:test-epoch", "e1")
    conn.set("aex:test-result", "an earlier job")
    conn.rpush(queue, "waiting")

    def attempt(*conditions):
        lead = [["SET", "aex:test-pending", "audit"]]
        return rqueue.enqueue(conn, job_id=new_job_id(conn), **within_a_share(), lead=lead, conditions=list(conditions))

    holds = [absent("aex:test-none"), holding("aex:test-epoch", "e1"), shorter_than(queue, 2)]
    for moved in (absent("aex:test-result"), holding("aex:test-epoch", "e0"), holding("aex:test-none", "e1"),
                  shorter_than(queue, 1)):  # fmt: skip
        with pytest.raises(Moved):
            attempt(*holds, moved)
        assert conn.lrange(queue, 0, -1) == [b"waiting"] and not conn.exists("aex:test-share")
        assert not conn.exists("aex:test-upload") and not conn.exists("aex:test-pending")
    assert attempt(*holds) is True
    assert conn.llen(queue) == 2 and conn.zcard("aex:test-share") == 1
    assert conn.get("aex:test-upload") == b"sealed" and conn.get("aex:test-pending") == b"audit"
    with pytest.raises(ValueError, match="share"):  # checked in the share's script only
        rqueue.enqueue(conn, JobKind.CLASSIFY, JobKind.CLASSIFY, new_job_id(conn), {}, {}, 60, 60, 60, "d",
                       conditions=holds)  # fmt: skip


def test_waiting_for_an_end_reads_the_job_in_the_same_round_trip(conn):
    """``wait_for_end`` blocks on the Result stream and returns the job's record read right
    after the end, in one round trip: still queued when the wait runs out, ended once a worker
    wrote its end while the wait blocked, None for a job Redis does not have."""
    import threading

    from jobs.roundtrips import Tally, tallying

    queue = Queue(QUEUE_NAMES[JobKind.CLASSIFY], connection=conn, serializer=SERIALIZER)
    job = queue.enqueue("math.sqrt", 25.0, meta={"kind": "classify"}, result_ttl=100)
    tally = Tally()
    with tallying(tally):
        record, _ = rqueue.wait_for_end(conn, job.id, 0.05)
    assert record.status is ApiStatus.QUEUED and record.result is None and tally.count == 1

    tally, records = Tally(), []

    def wait() -> None:
        with tallying(tally):
            records.append(rqueue.wait_for_end(conn, job.id, 30)[0])

    waiting = threading.Thread(target=wait)
    waiting.start()
    time.sleep(0.3)  # the wait is blocked by now; rq's worker wants the main thread
    SimpleWorker([queue], connection=conn, serializer=SERIALIZER).work(burst=True)
    waiting.join(30)
    [record] = records
    assert record.status is ApiStatus.FINISHED and record.result == 5.0 and tally.count == 1
    assert rqueue.wait_for_end(conn, new_job_id(conn), 0.01) == (None, None)


def test_writes_made_with_the_wait_only_once_the_job_finished(conn):
    """``wait_for_end``'s ``when_finished``: made in the wait's own round trip, right after the
    reads, only when the job has finished (not while queued, not for a failed job), the clock's
    stand-in replaced by Redis's time (ISO 8601, UTC, milliseconds), the first write's reply
    returned; a script Redis lost (a flush) is loaded again."""
    from datetime import datetime

    from jobs.roundtrips import Tally, tallying

    queue = Queue(QUEUE_NAMES[JobKind.CLASSIFY], connection=conn, serializer=SERIALIZER)
    ok = queue.enqueue("math.sqrt", 25.0, meta={"kind": "classify"}, result_ttl=100)
    bad = queue.enqueue("math.sqrt", -1.0, meta={"kind": "classify"}, failure_ttl=100)

    def note(pipe) -> None:
        pipe.set("aex:test-noted", rqueue.CLOCK_STAND_IN)
        pipe.rpush("aex:test-notes", f"at {rqueue.CLOCK_STAND_IN}.")

    record, written = rqueue.wait_for_end(conn, ok.id, 0.05, note)
    assert record.status is ApiStatus.QUEUED and written is None and not conn.exists("aex:test-noted")
    SimpleWorker([queue], connection=conn, serializer=SERIALIZER).work(burst=True)

    record, written = rqueue.wait_for_end(conn, bad.id, 30, note)
    assert record.status is ApiStatus.FAILED and written is None and not conn.exists("aex:test-noted")
    before = datetime.now(UTC)
    tally = Tally()
    with tallying(tally):
        record, written = rqueue.wait_for_end(conn, ok.id, 30, note)
    after = datetime.now(UTC)
    assert record.status is ApiStatus.FINISHED and record.result == 5.0 and tally.count == 1
    assert written == b"OK"
    stamp = conn.get("aex:test-noted").decode()
    assert len(stamp) == len("2026-12-06T09:26:05.123+00:00") and stamp.endswith("+00:00")
    at = datetime.fromisoformat(stamp)
    assert before.replace(microsecond=before.microsecond // 1000 * 1000) <= at <= after
    assert conn.lrange("aex:test-notes", 0, -1) == [f"at {stamp}.".encode()]

    conn.script_flush()
    conn.delete("aex:test-noted")
    assert rqueue.wait_for_end(conn, ok.id, 30, note)[1] == b"OK" and conn.exists("aex:test-noted")


def test_a_job_restored_by_the_adapter_has_the_stamps_rq_reads(conn):
    """``restore_job`` reads a job's stamps without strptime: each equal to rq's own reading,
    an odd one (seconds only, rq's older format) handed to rq's parser."""
    job_id = enqueue(conn)
    key = Job.key_for(job_id)
    conn.hset(key, mapping={"started_at": "2026-12-06T21:33:00.000001Z", "ended_at": "2026-12-06T21:33:05Z"})
    conn.hset(key, "last_heartbeat", "2026-02-28T23:59:59.999999Z")
    raw = conn.hgetall(key)
    ours = restore_job(Job(job_id, connection=conn, serializer=SERIALIZER), raw)
    theirs = Job(job_id, connection=conn, serializer=SERIALIZER)
    theirs.restore(raw)
    for name in ("created_at", "enqueued_at", "started_at", "ended_at", "last_heartbeat"):
        assert getattr(ours, name) == getattr(theirs, name) is not None, name
        assert getattr(ours, name).tzinfo == UTC, name
    assert ours.ended_at.microsecond == 0 and ours.started_at.microsecond == 1
    assert ours.to_dict() == theirs.to_dict()
